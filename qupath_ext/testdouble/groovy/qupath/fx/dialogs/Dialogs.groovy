package qupath.fx.dialogs

/** Stub of QuPath's dialogs: records what would be shown. */
class Dialogs {
    static List<String> shown = []
    static void showErrorMessage(String title, String message) { shown << "error: " + message }
    static void showInfoNotification(String title, String message) { shown << "info: " + message }
    static String showInputDialog(String title, String prompt, String initial) {
        return System.getenv("FAKE_QUPATH_ANSWER") ?: initial
    }
}
