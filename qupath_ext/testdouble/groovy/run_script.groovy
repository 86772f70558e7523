// groovy -cp <this folder> run_script.groovy SCRIPT STATE.json RESULT.json
// Runs SCRIPT as QuPath's script editor does: QPEx's static methods imported by default, and the script's
// own file named in the binding variable "qupath.script.file" (QuPath's ScriptAttributes.FILE_PATH).
import groovy.json.JsonOutput
import org.codehaus.groovy.control.CompilerConfiguration
import org.codehaus.groovy.control.customizers.ImportCustomizer
import qupath.lib.gui.scripting.QPEx

QPEx.load(new File(args[1]))
def conf = new CompilerConfiguration()
conf.addCompilationCustomizers(new ImportCustomizer().addStaticStars("qupath.lib.gui.scripting.QPEx"))
def script = new File(args[0])
def binding = new Binding(["qupath.script.file": script.absolutePath])
new GroovyShell(this.class.classLoader, binding, conf).evaluate(script)
new File(args[2]).text = JsonOutput.toJson(QPEx.dump())
