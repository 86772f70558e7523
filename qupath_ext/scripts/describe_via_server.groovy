/**
 * WSI-LLaVA for QuPath (0.6+): describe the selected annotations on your lab's `wsi-llava serve` server.
 *
 * Nothing to install on this computer: the script sends the selected annotations (QuPath's own GeoJSON)
 * and the slide's path to the server's /v1/describe, and writes the answers back into the same
 * annotations exactly as describe_selected.groovy does: description (appended under a dated heading
 * unless OVERWRITE), short name, "WSI-LLaVA" measurements, and with EVIDENCE the answer's relevant tiles
 * as "WSI-LLaVA evidence" detections below each annotation. A failure (server down, wrong token, a slide
 * the server cannot see, ...) is named in a dialog; nothing is changed then.
 *
 * The slide is named as the server sees it: SLIDE, else the image's file relative to SLIDES_ROOT_HERE
 * (where this computer sees the server's --slides-root, e.g. a mounted share), else the image file's own
 * path (a server on this computer or one with the same mount). SERVER, the token and the slides root
 * can also come from the environment QuPath was started in: WSI_LLAVA_SERVER, WSI_LLAVA_TOKEN (or
 * WSI_LLAVA_TOKEN_FILE), WSI_LLAVA_SLIDES_ROOT. Keep wsi_llava_common.groovy beside this script.
 */
import qupath.fx.dialogs.Dialogs

import groovy.json.JsonOutput
import groovy.json.JsonSlurper

import java.net.http.HttpClient
import java.net.http.HttpConnectTimeoutException
import java.net.http.HttpRequest
import java.net.http.HttpResponse
import java.net.http.HttpTimeoutException
import java.time.Duration

// ---- settings --------------------------------------------------------------------------------------
String SERVER = System.getenv("WSI_LLAVA_SERVER") ?: "http://localhost:8000"  // the server's address
String TOKEN_FILE = System.getenv("WSI_LLAVA_TOKEN_FILE") ?: ""  // file with the token ("": $WSI_LLAVA_TOKEN)
String QUESTION = "Describe the tissue in this region."
String SLIDE = ""               // the slide as the server sees it ("": derived from the image's file, see above)
String SLIDES_ROOT_HERE = System.getenv("WSI_LLAVA_SLIDES_ROOT") ?: ""  // the server's --slides-root, seen from here
String MODEL = ""               // a model the server lists ("": the server's default)
boolean OVERWRITE = false       // true: replace descriptions instead of appending
boolean SET_NAME = true         // also set a short name from the answer
boolean EVIDENCE = false        // true: also add the answer's relevant tiles as "WSI-LLaVA evidence" detections
int MAX_NEW_TOKENS = 0          // the longest answer in tokens (0: the model's default)
int TIMEOUT_SECONDS = 900       // the longest wait for the server's answer
// -----------------------------------------------------------------------------------------------------

def here = binding.variables["qupath.script.file"]  // QuPath names the file of the running script
def common = here ? new File(new File(here as String).parentFile, "wsi_llava_common.groovy") : null
if (common == null || !common.isFile())
    return Dialogs.showErrorMessage("WSI-LLaVA", "wsi_llava_common.groovy must be in the folder of this script; run the script from its file (File > Open in the script editor).")
def wsiLlava = evaluate(common)

/** The bearer token: TOKEN_FILE's first line, else $WSI_LLAVA_TOKEN, else null (a server without auth). */
String readToken(String tokenFile) {
    if (tokenFile) {
        def f = new File(tokenFile)
        if (!f.isFile())
            throw new IllegalArgumentException("TOKEN_FILE " + tokenFile + ": no such file")
        def token = f.text.trim().readLines().find { it.trim() }?.trim()
        if (!token)
            throw new IllegalArgumentException("TOKEN_FILE " + tokenFile + ": the file is empty")
        return token
    }
    return System.getenv("WSI_LLAVA_TOKEN")?.trim() ?: null
}

/** The slide as the server sees it: SLIDE, else the image file relative to slidesRoot, else its path. */
String serverSlide(String slide, String slidesRoot) {
    if (slide)
        return slide
    def file = getCurrentImageData().getServer().getURIs().findResult { uri ->
        uri.getScheme() == "file" ? new File(uri).getAbsoluteFile() : null
    }
    if (file == null)
        return null
    if (slidesRoot) {
        def root = new File(slidesRoot).getAbsoluteFile().toPath().normalize()
        def path = file.toPath().normalize()
        if (path.startsWith(root))
            return root.relativize(path).toString().replace(File.separator, "/")
    }
    return file.getPath()
}

/** The server's message from an ErrorBody reply, or null when the body is not the API's JSON. */
String serverMessage(String body) {
    try {
        def parsed = new JsonSlurper().parseText(body ?: "")
        return parsed instanceof Map && parsed.error instanceof Map ? parsed.error.message as String : null
    } catch (Exception ignored) {
        return null
    }
}

/** One sentence for a reply that is not a success, named by its status (401, 403, ...). */
String statusMessage(String url, HttpResponse<String> reply) {
    int status = reply.statusCode()
    def message = serverMessage(reply.body())
    def type = reply.headers().firstValue("content-type").orElse("")
    if (message == null && !type.contains("json"))
        return url + ": the reply (HTTP " + status + ") is " + (type.contains("html") ? "an HTML page" : "'" + type + "'") +
            ", not the wsi-llava API's JSON: is SERVER the server's address, or is a proxy or login page in between?"
    message = message ?: "HTTP " + status
    switch (status) {
        case 401: return url + ": 401 unauthorized: " + message + "; set TOKEN_FILE (or WSI_LLAVA_TOKEN) to the server's token"
        case 403: return url + ": 403 forbidden: " + message
        case 404: return url + ": 404 not found: " + message
        case 413: return url + ": 413 too large: " + message
        case 429:
            def after = reply.headers().firstValue("retry-after").orElse(null)
            return url + ": 429 the server is busy: " + message + (after ? "; try again in " + after + " s" : "; try again later")
        case 503: return url + ": 503 the server is shutting down (draining): " + message
        default: return url + ": HTTP " + status + ": " + message
    }
}

/** One sentence for a request that got no reply: name not resolved, refused, timeout, TLS. */
String transportMessage(String url, Exception e, int timeout) {
    def host = new URI(url).getHost()
    def causes = []
    for (Throwable c = e; c != null && !causes.contains(c); c = c.getCause())
        causes << c
    if (causes.any { it instanceof java.nio.channels.UnresolvedAddressException || it instanceof UnknownHostException })
        return url + ": the host name '" + host + "' does not resolve (a typo, or a name only your lab's network or VPN knows?)"
    if (causes.any { it instanceof HttpConnectTimeoutException })
        return url + ": the server took longer than " + timeout + " s to connect; is the address right and the server up?"
    if (causes.any { it instanceof HttpTimeoutException })
        return url + ": the server took longer than " + timeout + " s to reply"
    if (causes.any { it instanceof javax.net.ssl.SSLException })
        return url + ": the TLS (https) handshake failed (" + causes.find { it instanceof javax.net.ssl.SSLException }.getMessage() +
            "); a certificate this computer does not trust, or is the port plain http?"
    if (causes.any { it instanceof ConnectException })
        return url + ": connection refused: nothing listens there; is `wsi-llava serve` running, on this port?"
    return url + ": cannot reach the server (" + e.getClass().getSimpleName() + ": " + e.getMessage() + ")"
}

/** Send one request; the reply's JSON as a Map, or a String starting with "ERROR: " naming the failure. */
def exchange(HttpClient http, HttpRequest request, int timeout) {
    def url = request.uri().toString()
    HttpResponse<String> reply
    try {
        reply = http.send(request, HttpResponse.BodyHandlers.ofString())
    } catch (IOException e) {
        return "ERROR: " + transportMessage(url, e, timeout)
    }
    if (reply.statusCode() < 200 || reply.statusCode() >= 300)
        return "ERROR: " + statusMessage(url, reply)
    try {
        return new JsonSlurper().parseText(reply.body()) as Map
    } catch (Exception ignored) {
        return "ERROR: " + statusMessage(url, reply)
    }
}

/** Describe the selected annotations on the server; returns a message for the user. */
String describeViaServer(Map s, wsiLlava) {
    def selected = wsiLlava.selectedAnnotations()
    if (selected instanceof String)
        return selected
    def slide = serverSlide(s.SLIDE as String, s.SLIDES_ROOT_HERE as String)
    if (slide == null)
        return "ERROR: the image is not a file QuPath opened from disk: set SLIDE to its path as the server sees it."
    String base = (s.SERVER as String).trim().replaceAll('/+$', "").replaceAll('/v1$', "")
    if (!(base ==~ /(?i)https?:\/\/[^\/\s]+/))
        return "ERROR: SERVER '" + s.SERVER + "': expected the server's address as http://HOST:PORT or https://HOST:PORT"
    String token
    try {
        token = readToken(s.TOKEN_FILE as String)
    } catch (IllegalArgumentException e) {
        return "ERROR: " + e.getMessage()
    }
    int timeout = s.TIMEOUT_SECONDS as int
    def http = HttpClient.newBuilder().connectTimeout(Duration.ofSeconds(Math.min(10, timeout))).build()

    def health = exchange(http, HttpRequest.newBuilder(URI.create(base + "/v1/health"))
            .timeout(Duration.ofSeconds(Math.min(30, timeout))).GET().build(), Math.min(30, timeout))
    if (health instanceof String)
        return health
    if (!(health.api instanceof String) || (health.api as String).split("\\.")[0] != "v1")
        return "ERROR: " + base + ": the server speaks API " + health.api + " (wsi-llava " + health.version +
            "), this script v1: use the script of the server's wsi-llava version"

    def inJson = wsiLlava.exportSelected()
    def outJson = new File(inJson.parentFile, "described.geojson")
    // the export goes into the request as written (QuPath's own GeoJSON, NaN measurements included)
    def settings = [slide: slide, question: s.QUESTION, overwrite: s.OVERWRITE, set_name: s.SET_NAME]
    if (s.MODEL)
        settings.model = s.MODEL
    if ((s.MAX_NEW_TOKENS as int) > 0)
        settings.max_new_tokens = s.MAX_NEW_TOKENS
    if (s.EVIDENCE)
        settings.evidence = [:]
    def json = JsonOutput.toJson(settings)
    def body = json.substring(0, json.length() - 1) + ',"features":' + inJson.getText("UTF-8") + "}"
    def builder = HttpRequest.newBuilder(URI.create(base + "/v1/describe"))
            .timeout(Duration.ofSeconds(timeout))
            .header("Content-Type", "application/json")
            .header("Accept", "application/json")
    if (token)
        builder.header("Authorization", "Bearer " + token)
    println "WSI-LLaVA: asking " + base + " about " + selected.size() + " annotation(s) of " + slide
    def result = exchange(http, builder.POST(HttpRequest.BodyPublishers.ofString(body, java.nio.charset.StandardCharsets.UTF_8)).build(), timeout)
    if (result instanceof String)
        return result
    def failed = (result.results ?: []).findAll { it.error }
    failed.each { println "WSI-LLaVA: " + it.label + ": FAILED: " + it.error }
    if (!result.described)
        return "ERROR: no annotation was described (" + failed.collect { it.label + ": " + it.error }.join("; ") + ")"
    outJson.setText(JsonOutput.toJson(result.features), "UTF-8")
    return wsiLlava.writeBack(selected, outJson, s.EVIDENCE as boolean) +
        (failed ? " (" + failed.size() + " failed, left unchanged)" : "") + "."
}

def settings = [SERVER: SERVER, TOKEN_FILE: TOKEN_FILE, QUESTION: QUESTION, SLIDE: SLIDE,
                SLIDES_ROOT_HERE: SLIDES_ROOT_HERE, MODEL: MODEL, OVERWRITE: OVERWRITE, SET_NAME: SET_NAME,
                EVIDENCE: EVIDENCE, MAX_NEW_TOKENS: MAX_NEW_TOKENS, TIMEOUT_SECONDS: TIMEOUT_SECONDS]
wsiLlava.showResult(describeViaServer(settings, wsiLlava))
