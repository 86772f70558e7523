import groovy.json.JsonOutput
import groovy.json.JsonSlurper
import qupath.lib.objects.PathObject

/** Base class standing in for QuPath's default QPEx imports, over the state file $FAKE_QUPATH_STATE. */
abstract class FakeQP extends Script {
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

    def getCurrentImageData() {
        if (state.uri == null) return null
        def server = [getURIs: { -> [new URI(state.uri as String)] }]
        return [getServer: { -> server }]
    }

    List<PathObject> getSelectedObjects() { objects.findAll { selected.contains(it.getID()) } }

    boolean exportSelectedObjectsToGeoJson(String path, String... options) {
        def fc = [type: "FeatureCollection", features: getSelectedObjects().collect { it.toFeature() }]
        new File(path).text = JsonOutput.toJson(fc)
        return true
    }

    void fireHierarchyUpdate() { updates++ }
}
