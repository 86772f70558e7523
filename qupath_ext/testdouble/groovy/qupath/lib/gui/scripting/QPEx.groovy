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
        state.objects.eachWithIndex { feature, i ->  // an object may start below another: "parent": its id
            def parent = feature.parent ? objects.find { it.getID().toString() == feature.parent } : null
            if (parent != null) new FakeHierarchy().addObjectBelowParent(parent, objects[i], false)
        }
    }

    /** Every object as a feature; a detection also names its parent's id under "parent". */
    static Map dump() {
        def features = objects.collect { o ->
            def f = o.toFeature()
            if (o.isDetection()) f.parent = o.parent?.getID()?.toString()
            return f
        }
        return [objects: features, updates: updates, dialogs: qupath.fx.dialogs.Dialogs.shown]
    }

    /** The few PathObjectHierarchy methods the scripts call, over ``objects``. */
    static class FakeHierarchy {
        boolean addObjectBelowParent(PathObject parent, PathObject child, boolean fireUpdate) {
            child.parent?.children?.remove(child)
            child.parent = parent
            parent?.children?.add(child)
            if (!QPEx.objects.contains(child)) QPEx.objects << child
            return true
        }

        void removeObjects(Collection<PathObject> toRemove, boolean keepChildren) {
            for (o in new ArrayList<PathObject>(toRemove)) {
                o.parent?.children?.remove(o)
                new ArrayList<PathObject>(o.children).each {
                    if (keepChildren) addObjectBelowParent(o.parent, it, false) else removeObjects([it], false)
                }
                QPEx.objects.remove(o)
                o.parent = null
            }
        }
    }

    static def getCurrentHierarchy() { new FakeHierarchy() }

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
