// groovy -cp <this folder> run_script.groovy SCRIPT STATE.json RESULT.json
import groovy.json.JsonOutput
import org.codehaus.groovy.control.CompilerConfiguration

FakeQP.load(new File(args[1]))
def conf = new CompilerConfiguration()
conf.scriptBaseClass = "FakeQP"
def shell = new GroovyShell(this.class.classLoader, new Binding(), conf)
shell.evaluate(new File(args[0]))
new File(args[2]).text = JsonOutput.toJson(FakeQP.dump())
