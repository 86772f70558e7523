// A test double of QuPath's py4j entry point (qupath.ext.py4j.core.QuPathEntryPoint, which extends QPEx):
// only the calls the wsi-llava bridge and qubalab's create_gateway make, with the same names and shapes.
// Compiled in the tests with: javac -cp <py4j jar> -d BUILD FakeQuPath.java ; run: java FakeQuPath PORT [TOKEN]
// Methods named test* exist only here: the Python tests use them to open an image and add objects.

import java.awt.Color;
import java.awt.Graphics2D;
import java.awt.RenderingHints;
import java.awt.image.BufferedImage;
import java.io.ByteArrayOutputStream;
import java.io.File;
import java.io.IOException;
import java.net.URI;
import java.util.ArrayList;
import java.util.Base64;
import java.util.Collection;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import java.util.UUID;
import javax.imageio.ImageIO;
import py4j.GatewayServer;

public class FakeQuPath {

    // --- objects ----------------------------------------------------------------------------------------
    // A feature whose measurements are a list of {name, value} makes a QuPath <= 0.3 object
    // (FakeLegacyPathObject: getMeasurementList().putMeasurement, exported as that list again); otherwise a
    // QuPath >= 0.4 one (FakePathObject: getMeasurements() is a live map, exported as an object).
    public abstract static class FakeObjectBase {
        private final UUID id;
        private final String objectType;
        private final Object geometry;                 // the ROI, kept as the GeoJSON geometry it came from
        private final Map<String, Object> otherProperties; // e.g. classification, color: written back verbatim
        private String name;
        private String description;
        protected final Map<String, Number> measurements = new LinkedHashMap<>();
        private FakeObjectBase parent;                 // null: below the hierarchy's root
        private final List<FakeObjectBase> children = new ArrayList<>();

        @SuppressWarnings("unchecked")
        FakeObjectBase(Map<String, Object> feature) {
            Object fid = feature.get("id");
            this.id = fid == null ? UUID.randomUUID() : UUID.fromString((String) fid);
            this.geometry = feature.get("geometry");
            Map<String, Object> props = new LinkedHashMap<>();
            if (feature.get("properties") instanceof Map) props.putAll((Map<String, Object>) feature.get("properties"));
            Object type = props.remove("objectType");
            this.objectType = type == null ? "annotation" : (String) type;
            this.name = (String) props.remove("name");
            Object meta = props.remove("metadata");
            if (meta instanceof Map) this.description = (String) ((Map<String, Object>) meta).get("ANNOTATION_DESCRIPTION");
            Object ms = props.remove("measurements");
            if (ms instanceof Map)
                for (Map.Entry<String, Object> e : ((Map<String, Object>) ms).entrySet())
                    measurements.put(e.getKey(), (Number) e.getValue());
            if (ms instanceof List)
                for (Object m : (List<Object>) ms)
                    measurements.put((String) ((Map<String, Object>) m).get("name"),
                                     (Number) ((Map<String, Object>) m).get("value"));
            this.otherProperties = props;
        }
        public UUID getID() { return id; }
        public boolean isAnnotation() { return "annotation".equals(objectType); }
        public boolean isDetection() { return "detection".equals(objectType) || "cell".equals(objectType); }
        public FakeObjectBase getParent() { return parent; }
        public List<FakeObjectBase> getChildObjects() { return new ArrayList<>(children); } // unmodifiable in QuPath
        public FakePathClass getPathClass() { return FakePathClass.of(otherProperties.get("classification")); }
        public String getName() { return name; }
        public void setName(String name) { this.name = name; }
        public String getDescription() { return description; }    // PathAnnotationObject
        public void setDescription(String d) { this.description = d; }

        abstract Object measurementsJson();

        String toGeoJson() {
            Map<String, Object> p = new LinkedHashMap<>();
            p.put("objectType", objectType);
            if (name != null) p.put("name", name);
            p.putAll(otherProperties);
            if (description != null) p.put("metadata", Map.of("ANNOTATION_DESCRIPTION", description));
            if (!measurements.isEmpty()) p.put("measurements", measurementsJson());
            Map<String, Object> f = new LinkedHashMap<>();
            f.put("type", "Feature");
            f.put("id", id.toString());
            f.put("geometry", geometry);
            f.put("properties", p);
            return Json.write(f);
        }
    }

    /** QuPath's PathClass: toString() is the full name ("Tumor: Positive"), getName() its last part. */
    public static class FakePathClass {
        private final List<String> names;
        FakePathClass(List<String> names) { this.names = names; }
        public String getName() { return names.get(names.size() - 1); }
        @Override public String toString() { return String.join(": ", names); }

        @SuppressWarnings("unchecked")
        static FakePathClass of(Object classification) {
            if (classification instanceof String) return new FakePathClass(List.of(((String) classification).split(": ")));
            if (!(classification instanceof Map)) return null;
            Map<String, Object> c = (Map<String, Object>) classification;
            if (c.get("names") instanceof List) return new FakePathClass((List<String>) c.get("names"));
            if (c.get("name") instanceof String) return new FakePathClass(List.of(((String) c.get("name")).split(": ")));
            return null;
        }
    }

    public static class FakePathObject extends FakeObjectBase {
        FakePathObject(Map<String, Object> feature) { super(feature); }
        public Map<String, Number> getMeasurements() { return measurements; } // QuPath >= 0.4: a live map
        Object measurementsJson() { return measurements; }
    }

    public static class FakeMeasurementList {                  // QuPath <= 0.3
        private final Map<String, Number> values;
        FakeMeasurementList(Map<String, Number> values) { this.values = values; }
        public boolean putMeasurement(String name, double value) { values.put(name, value); return true; }
    }

    public static class FakeLegacyPathObject extends FakeObjectBase {
        FakeLegacyPathObject(Map<String, Object> feature) { super(feature); }
        public FakeMeasurementList getMeasurementList() { return new FakeMeasurementList(measurements); }
        Object measurementsJson() {
            List<Object> out = new ArrayList<>();
            for (Map.Entry<String, Number> e : measurements.entrySet()) {
                Map<String, Object> m = new LinkedHashMap<>();
                m.put("name", e.getKey());
                m.put("value", e.getValue());
                out.add(m);
            }
            return out;
        }
    }

    public static class FakeSelectionModel {
        private final List<FakeObjectBase> selected = new ArrayList<>();
        public List<FakeObjectBase> getSelectedObjects() { return selected; }
    }

    public static class FakeHierarchy {
        private final List<FakeObjectBase> objects = new ArrayList<>();
        private final FakeSelectionModel selection = new FakeSelectionModel();
        public List<FakeObjectBase> getAnnotationObjects() {
            List<FakeObjectBase> out = new ArrayList<>();
            for (FakeObjectBase o : objects) if (o.isAnnotation()) out.add(o);
            return out;
        }
        public List<FakeObjectBase> getDetectionObjects() {
            List<FakeObjectBase> out = new ArrayList<>();
            for (FakeObjectBase o : objects) if (o.isDetection()) out.add(o);
            return out;
        }
        public List<FakeObjectBase> getAllObjects(boolean includeRoot) { return objects; }
        public FakeSelectionModel getSelectionModel() { return selection; }
        public boolean addObjects(Collection<FakeObjectBase> toAdd) { return objects.addAll(toAdd); }

        /** As QuPath's: ``pathObject`` becomes a child of ``parent`` (null: the root), without resolving. */
        public boolean addObjectBelowParent(FakeObjectBase parent, FakeObjectBase pathObject, boolean fireUpdate) {
            if (parent == pathObject) throw new IllegalArgumentException("Cannot add a PathObject as a descendent of itself!");
            if (parent != null && !objects.contains(parent)) throw new IllegalArgumentException("parent is not in the hierarchy");
            if (pathObject.parent != null) pathObject.parent.children.remove(pathObject);
            pathObject.parent = parent;
            if (parent != null) parent.children.add(pathObject);
            if (!objects.contains(pathObject)) objects.add(pathObject);
            return true;
        }

        /** As QuPath's: removes the objects (and, unless keepChildren, their descendants). */
        public void removeObjects(Collection<FakeObjectBase> toRemove, boolean keepChildren) {
            for (FakeObjectBase o : new ArrayList<>(toRemove)) {
                if (!objects.contains(o)) continue;
                if (o.parent != null) o.parent.children.remove(o);
                for (FakeObjectBase child : new ArrayList<>(o.children)) {
                    if (keepChildren) addObjectBelowParent(o.parent, child, false);
                    else removeObjects(List.of(child), false);
                }
                objects.remove(o);
                selection.selected.remove(o);
                o.parent = null;
            }
        }
    }

    // --- image ------------------------------------------------------------------------------------------
    public static class FakeCalibration {
        private final double mpp;
        FakeCalibration(double mpp) { this.mpp = mpp; }
        public double getAveragedPixelSizeMicrons() { return mpp; }
    }

    public static class FakeServer {
        private final String uri;
        private final String png;
        private final int width, height;
        private final double mpp;
        private final List<Double> downsamples = new ArrayList<>();
        private BufferedImage pixels;

        FakeServer(String uri, String png, int width, int height, double mpp) {
            this.uri = uri; this.png = png; this.width = width; this.height = height; this.mpp = mpp;
            double ds = 1;
            while (Math.max(width, height) / ds >= 256) { downsamples.add(ds); ds *= 4; }
            if (downsamples.isEmpty()) downsamples.add(1.0);
        }
        public String getPath() { return uri; }
        public Collection<URI> getURIs() { return List.of(URI.create(uri)); }
        public int getWidth() { return width; }
        public int getHeight() { return height; }
        public FakeCalibration getPixelCalibration() { return new FakeCalibration(mpp); }
        public int nResolutions() { return downsamples.size(); }
        public double getDownsampleForResolution(int level) { return downsamples.get(level); }

        synchronized BufferedImage pixels() throws IOException {
            if (png == null) throw new IOException("the test image has no pixels");
            if (pixels == null) pixels = ImageIO.read(new File(png));
            return pixels;
        }
    }

    public static class FakeImageData {
        private final FakeServer server;
        private final FakeHierarchy hierarchy = new FakeHierarchy();
        FakeImageData(FakeServer server) { this.server = server; }
        public FakeServer getServer() { return server; }
        public FakeHierarchy getHierarchy() { return hierarchy; }
    }

    public static class FakeGUI {
        private final FakeQuPath owner;
        FakeGUI(FakeQuPath owner) { this.owner = owner; }
        public FakeImageData getImageData() { return owner.imageData; }
    }

    // --- entry point ------------------------------------------------------------------------------------
    private final FakeGUI gui = new FakeGUI(this);
    private FakeImageData imageData;
    private int hierarchyUpdates = 0;

    public static String getExtensionVersion() { return "0.0-testdouble"; }
    public FakeGUI getQuPath() { return gui; }
    public FakeImageData getCurrentImageData() { return imageData; }
    public void fireHierarchyUpdate() { hierarchyUpdates++; }

    public List<String> toGeoJsonFeatureList(Collection<FakeObjectBase> objects) {
        List<String> out = new ArrayList<>();
        for (FakeObjectBase o : objects) out.add(o.toGeoJson());
        return out;
    }

    @SuppressWarnings("unchecked")
    public List<FakeObjectBase> toPathObjects(String geoJson) {
        Object parsed = Json.parse(geoJson);
        List<Object> features = new ArrayList<>();
        if (parsed instanceof List) features.addAll((List<Object>) parsed);
        else if (((Map<String, Object>) parsed).containsKey("features"))
            features.addAll((List<Object>) ((Map<String, Object>) parsed).get("features"));
        else features.add(parsed);
        List<FakeObjectBase> out = new ArrayList<>();
        for (Object f : features) {
            Map<String, Object> feature = (Map<String, Object>) f;
            Object props = feature.get("properties");
            boolean legacy = props instanceof Map && ((Map<String, Object>) props).get("measurements") instanceof List;
            out.add(legacy ? new FakeLegacyPathObject(feature) : new FakePathObject(feature));
        }
        return out;
    }

    public String getImageBase64(FakeServer server, double downsample, int x, int y, int width, int height,
                                 String format) throws IOException {
        BufferedImage src = server.pixels();
        int ow = Math.max(1, (int) Math.round(width / downsample));
        int oh = Math.max(1, (int) Math.round(height / downsample));
        BufferedImage out = new BufferedImage(ow, oh, BufferedImage.TYPE_INT_RGB);
        Graphics2D g = out.createGraphics();
        g.setColor(Color.WHITE);
        g.fillRect(0, 0, ow, oh);
        g.setRenderingHint(RenderingHints.KEY_INTERPOLATION, RenderingHints.VALUE_INTERPOLATION_BILINEAR);
        g.drawImage(src, 0, 0, ow, oh, x, y, x + width, y + height, null);
        g.dispose();
        ByteArrayOutputStream bytes = new ByteArrayOutputStream();
        ImageIO.write(out, format, bytes);
        return Base64.getEncoder().encodeToString(bytes.toByteArray());
    }

    // --- set-up and inspection for the tests ------------------------------------------------------------
    public int testHierarchyUpdates() { return hierarchyUpdates; }

    public void testOpenImage(String uri, String png, int width, int height, double mpp) {
        imageData = uri == null ? null : new FakeImageData(new FakeServer(uri, png, width, height, mpp));
    }

    public String testAddObject(String featureJson, boolean selected) {
        FakeObjectBase o = toPathObjects(featureJson).get(0);
        imageData.getHierarchy().objects.add(o);
        if (selected) imageData.getHierarchy().getSelectionModel().selected.add(o);
        return o.getID().toString();
    }

    /** A minimal JSON reader/writer (the test double has no Gson): objects keep their key order. */
    static final class Json {
        private final String s;
        private int i = 0;
        private Json(String s) { this.s = s; }

        static Object parse(String text) {
            Json p = new Json(text);
            Object v = p.value();
            p.ws();
            if (p.i != text.length()) throw new IllegalArgumentException("trailing characters at " + p.i);
            return v;
        }

        private void ws() { while (i < s.length() && Character.isWhitespace(s.charAt(i))) i++; }

        private Object value() {
            ws();
            char c = s.charAt(i);
            if (c == '{') {
                Map<String, Object> m = new LinkedHashMap<>();
                i++; ws();
                if (s.charAt(i) == '}') { i++; return m; }
                while (true) {
                    ws(); String k = string(); ws(); i++; // ':'
                    m.put(k, value()); ws();
                    if (s.charAt(i++) == '}') return m;
                }
            }
            if (c == '[') {
                List<Object> l = new ArrayList<>();
                i++; ws();
                if (s.charAt(i) == ']') { i++; return l; }
                while (true) {
                    l.add(value()); ws();
                    if (s.charAt(i++) == ']') return l;
                }
            }
            if (c == '"') return string();
            if (s.startsWith("true", i)) { i += 4; return Boolean.TRUE; }
            if (s.startsWith("false", i)) { i += 5; return Boolean.FALSE; }
            if (s.startsWith("null", i)) { i += 4; return null; }
            int start = i;
            while (i < s.length() && "+-0123456789.eE".indexOf(s.charAt(i)) >= 0) i++;
            return Double.parseDouble(s.substring(start, i));
        }

        private String string() {
            StringBuilder b = new StringBuilder();
            i++; // opening quote
            while (true) {
                char c = s.charAt(i++);
                if (c == '"') return b.toString();
                if (c != '\\') { b.append(c); continue; }
                char e = s.charAt(i++);
                switch (e) {
                    case 'n': b.append('\n'); break;
                    case 't': b.append('\t'); break;
                    case 'r': b.append('\r'); break;
                    case 'b': b.append('\b'); break;
                    case 'f': b.append('\f'); break;
                    case 'u': b.append((char) Integer.parseInt(s.substring(i, i + 4), 16)); i += 4; break;
                    default: b.append(e);
                }
            }
        }

        @SuppressWarnings("unchecked")
        static String write(Object v) {
            if (v == null) return "null";
            if (v instanceof String) return q((String) v);
            if (v instanceof Boolean) return v.toString();
            if (v instanceof Number) {
                double d = ((Number) v).doubleValue();
                if (!Double.isFinite(d)) return q(Double.toString(d)); // QuPath writes "NaN", "Infinity"
                return d == Math.rint(d) && Math.abs(d) < 1e15 ? Long.toString((long) d) : Double.toString(d);
            }
            StringBuilder b = new StringBuilder();
            if (v instanceof Map) {
                b.append('{');
                int n = 0;
                for (Map.Entry<String, Object> e : ((Map<String, Object>) v).entrySet())
                    b.append(n++ > 0 ? "," : "").append(q(e.getKey())).append(':').append(write(e.getValue()));
                return b.append('}').toString();
            }
            b.append('[');
            int n = 0;
            for (Object o : (Collection<Object>) v) b.append(n++ > 0 ? "," : "").append(write(o));
            return b.append(']').toString();
        }
    }

    static String q(String s) {
        StringBuilder b = new StringBuilder("\"");
        for (char c : s.toCharArray()) {
            switch (c) {
                case '"': b.append("\\\""); break;
                case '\\': b.append("\\\\"); break;
                case '\n': b.append("\\n"); break;
                case '\r': b.append("\\r"); break;
                case '\t': b.append("\\t"); break;
                default:
                    if (c < 0x20) b.append(String.format("\\u%04x", (int) c)); else b.append(c);
            }
        }
        return b.append('"').toString();
    }

    public static void main(String[] args) {
        GatewayServer.GatewayServerBuilder builder = new GatewayServer.GatewayServerBuilder(new FakeQuPath())
            .javaPort(Integer.parseInt(args[0]));
        if (args.length > 1) builder = builder.authToken(args[1]);
        GatewayServer server = builder.build();
        server.start();
        System.out.println("GATEWAY_STARTED " + server.getListeningPort());
        System.out.flush();
    }
}
