package qupath.lib.objects

import qupath.lib.roi.ROI

/** Stub of a QuPath object: id, type, name, description (annotations), classification, measurements,
 *  geometry (its ROI) and its place in the hierarchy (parent, children). */
class PathObject {
    UUID id
    String objectType = "annotation"
    String name
    String description
    Object classification
    Map<String, Number> measurements = [:]
    Map geometry
    PathObject parent
    List<PathObject> children = []
    UUID getID() { id }
    boolean isAnnotation() { objectType == "annotation" }
    boolean isDetection() { objectType in ["detection", "cell"] }
    Map<String, Number> getMeasurements() { measurements }
    ROI getROI() { qupath.lib.roi.ROI.fromGeometry(geometry) }
    Collection<PathObject> getChildObjects() { children.asImmutable() }

    /** QuPath's PathClass: toString() is the full name, e.g. "Tumor: Positive". */
    Object getPathClass() {
        def c = classification
        String text = c instanceof String ? c : c instanceof Map ? (c.names ? c.names.join(": ") : c.name) : null
        return text == null ? null : new Object() { String toString() { text } }
    }

    static PathObject fromFeature(Map f) {
        def p = f.properties ?: [:]
        def ms = p.measurements ?: [:]
        if (ms instanceof List) ms = ms.collectEntries { [(it.name): it.value] }
        return new PathObject(id: f.id ? UUID.fromString(f.id as String) : UUID.randomUUID(),
                objectType: p.objectType ?: "annotation", name: p.name,
                description: p.metadata?.ANNOTATION_DESCRIPTION, classification: p.classification,
                measurements: ms as Map, geometry: f.geometry as Map)
    }

    Map toFeature() {
        def props = [objectType: objectType]
        if (name != null) props.name = name
        if (classification != null) props.classification = classification
        if (description != null) props.metadata = [ANNOTATION_DESCRIPTION: description]
        if (measurements) props.measurements = measurements
        return [type: "Feature", id: id.toString(), geometry: geometry, properties: props]
    }
}
