package qupath.lib.objects

/** Stub of a QuPath object: id, type, name, description (annotations), measurements, geometry. */
class PathObject {
    UUID id
    String objectType = "annotation"
    String name
    String description
    Map<String, Number> measurements = [:]
    Map geometry
    UUID getID() { id }
    boolean isAnnotation() { objectType == "annotation" }
    Map<String, Number> getMeasurements() { measurements }

    static PathObject fromFeature(Map f) {
        def p = f.properties ?: [:]
        return new PathObject(id: UUID.fromString(f.id as String), objectType: p.objectType ?: "annotation",
                name: p.name, description: p.metadata?.ANNOTATION_DESCRIPTION,
                measurements: (p.measurements ?: [:]) as Map, geometry: f.geometry as Map)
    }

    Map toFeature() {
        def props = [objectType: objectType]
        if (name != null) props.name = name
        if (description != null) props.metadata = [ANNOTATION_DESCRIPTION: description]
        if (measurements) props.measurements = measurements
        return [type: "Feature", id: id.toString(), geometry: geometry, properties: props]
    }
}
