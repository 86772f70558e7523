package qupath.lib.gui.scripting

import groovy.json.JsonOutput
import groovy.json.JsonSlurper
import qupath.lib.objects.PathObject

/** Stub of QuPath's QPEx static methods the scripts call, over a state file (see run_script.groovy). */
class QPEx {
    static Map state
    static List<PathObject> objects = []
    static Set<UUID> selected = [] as Set
    static int updates = 0

    static void load(File f) {
        state = new JsonSlurper().parse(f) as Map
        objects = state.objects.collect { PathObject.fromFeature(it as Map) }
        selected = state.objects.findAll { it.selected }.collect { UUID.fromString(it.id as String) } as Set
    }

    static Map dump() {
        return [objects: objects.collect { it.toFeature() }, updates: updates,
                dialogs: qupath.fx.dialogs.Dialogs.shown]
    }

    static def getCurrentImageData() {
        if (state.uri == null) return null
        def server = [getURIs: { -> [new URI(state.uri as String)] }]
        return [getServer: { -> server }]
    }

    static List<PathObject> getSelectedObjects() { objects.findAll { selected.contains(it.getID()) } }

    static boolean exportSelectedObjectsToGeoJson(String path, String... options) {
        def fc = [type: "FeatureCollection", features: getSelectedObjects().collect { it.toFeature() }]
        new File(path).text = JsonOutput.toJson(fc)
        return true
    }

    static void fireHierarchyUpdate() { updates++ }
}
