/**
 * WSI-LLaVA for QuPath (0.6+): the code describe_selected.groovy, ask_wsi_llava.groovy and
 * describe_via_server.groovy share.
 *
 * Keep this file in the same folder as those scripts: each loads it from beside its own file (QuPath
 * names the running script's file) with `evaluate`. Running it on its own does nothing.
 */
import static qupath.lib.gui.scripting.QPEx.*

import qupath.fx.dialogs.Dialogs
import qupath.lib.io.PathIO
import qupath.lib.objects.PathObject

import java.nio.file.Files

/** The wsi-llava program: $WSI_LLAVA, else the first `wsi-llava` on PATH, else null. */
String findWsiLlava() {
    def fromEnv = System.getenv("WSI_LLAVA")
    if (fromEnv && new File(fromEnv).canExecute())
        return fromEnv
    def names = System.getProperty("os.name").toLowerCase().contains("win") ? ["wsi-llava.exe", "wsi-llava"] : ["wsi-llava"]
    for (dir in (System.getenv("PATH") ?: "").split(File.pathSeparator)) {
        for (name in names) {
            def f = new File(dir, name)
            if (f.isFile() && f.canExecute())
                return f.getAbsolutePath()
        }
    }
    return null
}

/** The command line that describes the exported annotations (one argument per element). */
List<String> buildCommand(String exe, String slide, String inJson, String outJson, String question,
                          boolean overwrite, boolean setName, String model, boolean evidence) {
    def cmd = [exe, "describe", "--slide", slide, "--geojson", inJson, "-o", outJson,
               "--question", question, "--model", model]
    if (overwrite)
        cmd << "--overwrite"
    if (setName)
        cmd << "--name"
    if (evidence)
        cmd << "--evidence"
    return cmd
}

/** Copy description, name and WSI-LLaVA measurements from the described objects onto the originals. */
int applyAnswers(Collection<PathObject> targets, Collection<PathObject> described) {
    def byId = [:]
    for (d in described)
        byId[d.getID()] = d
    int n = 0
    for (target in targets) {
        def d = byId[target.getID()]
        if (d == null || (d.getDescription() == target.getDescription() && d.getName() == target.getName()))
            continue  // not described (its answer failed): left as it was
        target.setDescription(d.getDescription())
        target.setName(d.getName())
        d.getMeasurements().each { k, v -> if (k.startsWith("WSI-LLaVA")) target.getMeasurements().put(k, v) }
        n++
    }
    return n
}

boolean isEvidence(PathObject p) {
    return p.isDetection() && p.getPathClass()?.toString() == "WSI-LLaVA evidence"
}

/** Put each evidence tile of the described file below the annotation it lies in (its centre, as QuPath
 *  places detections; a tile of an annotation smaller than a tile: the one it overlaps), replacing that
 *  annotation's earlier evidence. Returns the number of tiles added. */
int applyEvidence(Collection<PathObject> targets, Collection<PathObject> described) {
    def tiles = described.findAll { isEvidence(it) }
    def owner = [:]
    def overlap = { a, b ->
        a.getBoundsX() < b.getBoundsX() + b.getBoundsWidth() && b.getBoundsX() < a.getBoundsX() + a.getBoundsWidth() &&
            a.getBoundsY() < b.getBoundsY() + b.getBoundsHeight() && b.getBoundsY() < a.getBoundsY() + a.getBoundsHeight()
    }
    for (tile in tiles) {
        def r = tile.getROI()
        def t = targets.find { it.getROI().contains(r.getCentroidX(), r.getCentroidY()) } ?:
                targets.find { overlap(it.getROI(), r) }
        if (t != null)
            owner[tile] = t
    }
    def hierarchy = getCurrentHierarchy()
    for (target in new LinkedHashSet(owner.values())) {
        hierarchy.removeObjects(target.getChildObjects().findAll { isEvidence(it) }, false)
        owner.findAll { it.value == target }.each { tile, t -> hierarchy.addObjectBelowParent(t, tile, false) }
    }
    return owner.size()
}

/** The selected annotations of the open image, or a message ("ERROR: ...") saying what is missing. */
def selectedAnnotations() {
    if (getCurrentImageData() == null)
        return "ERROR: open an image first."
    def selected = getSelectedObjects().findAll { it.isAnnotation() }
    return selected.isEmpty() ? "ERROR: select one or more annotations first." : selected
}

/** The selection exported as QuPath's GeoJSON into a new temporary folder; the file. */
File exportSelected() {
    def inJson = new File(Files.createTempDirectory("wsi-llava-").toFile(), "selected.geojson")
    exportSelectedObjectsToGeoJson(inJson.getAbsolutePath(), "FEATURE_COLLECTION")
    return inJson
}

/** Write the answers (and, with evidence, the tiles) of the described GeoJSON file into ``selected``, redraw;
 * what was written, in words. */
String writeBack(selected, File described, boolean evidence) {
    def objects = PathIO.readObjects(described.toPath())
    int n = applyAnswers(selected, objects)
    String tiles = evidence ? ", " + applyEvidence(selected, objects) + " evidence tile(s)" : ""
    fireHierarchyUpdate()
    return "WSI-LLaVA: answers written into " + n + " of " + selected.size() + " annotation(s)" + tiles
}

/** Run wsi-llava on the selected annotations; returns a message for the user. */
String describeSelected(String question, boolean overwrite, boolean setName, String model, boolean evidence) {
    def selected = selectedAnnotations()
    if (selected instanceof String)
        return selected
    def slide = getCurrentImageData().getServer().getURIs().findResult { uri ->
        uri.getScheme() == "file" && new File(uri).isFile() ? new File(uri).getAbsolutePath() : null
    }
    if (slide == null)
        return "ERROR: the image file is not on this computer; start the Python gateway " +
               "(Extensions > Py4J) and run `wsi-llava qupath describe --selected` instead."
    def exe = findWsiLlava()
    if (exe == null)
        return "ERROR: wsi-llava is not installed (or not on PATH). Install it with " +
               "pip install \"wsi-llava[qupath]\", or set WSI_LLAVA to the program's full path."
    def inJson = exportSelected()
    def outJson = new File(inJson.parentFile, "described.geojson")
    def cmd = buildCommand(exe, slide, inJson.getAbsolutePath(), outJson.getAbsolutePath(), question,
                           overwrite, setName, model, evidence)
    println "WSI-LLaVA: running " + cmd.collect { it.contains(" ") ? "'" + it + "'" : it }.join(" ")
    def proc = new ProcessBuilder(cmd).redirectErrorStream(true).start()
    proc.inputStream.eachLine { println it }
    int rc = proc.waitFor()
    if (rc != 0 || !outJson.isFile())
        return "ERROR: wsi-llava describe failed (exit code " + rc + "); see the log above."
    return writeBack(selected, outJson, evidence) + "."
}

/** Print the message and show it in QuPath: "ERROR: ..." as an error dialog, else as a notification. */
void showResult(String message) {
    println message
    if (message.startsWith("ERROR"))
        Dialogs.showErrorMessage("WSI-LLaVA", message.substring(7))
    else
        Dialogs.showInfoNotification("WSI-LLaVA", message)
}

return this
