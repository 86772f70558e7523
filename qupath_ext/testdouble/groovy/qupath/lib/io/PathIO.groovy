package qupath.lib.io

import groovy.json.JsonSlurper
import qupath.lib.objects.PathObject

/** Stub of QuPath's PathIO: reads objects from a GeoJSON FeatureCollection. */
class PathIO {
    static List<PathObject> readObjects(java.nio.file.Path path) {
        def data = new JsonSlurper().parse(path.toFile())
        return data.features.collect { PathObject.fromFeature(it as Map) }
    }
}
