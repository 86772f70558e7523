/**
 * WSI-LLaVA for QuPath (0.6+): ask a question about each selected annotation.
 *
 * Open in QuPath's script editor (Automate > Script editor) and Run; type the question. The selection
 * is exported as GeoJSON, `wsi-llava describe --question` writes an answer for each annotation, and
 * the answers are read back
 * (with QuPath's own GeoJSON reader) into the same annotations: description, short name and
 * "WSI-LLaVA" measurements. Nothing else changes; an existing description is kept and the answer
 * appended under a dated heading unless OVERWRITE is true. With EVIDENCE the answer's most relevant
 * tiles are added below each annotation as square "WSI-LLaVA evidence" detections with a
 * "WSI-LLaVA relevance" measurement (0-1; colour them with Measure > Show measurement maps),
 * replacing the annotation's earlier evidence.
 *
 * Needs the `wsi-llava` program (pip install "wsi-llava[qupath]"). If it is not on PATH, set the
 * environment variable WSI_LLAVA to its full path before starting QuPath. Keep wsi_llava_common.groovy
 * (the code the WSI-LLaVA scripts share) in the same folder as this script.
 */
import qupath.fx.dialogs.Dialogs

// ---- settings --------------------------------------------------------------------------------------
String QUESTION = "Is there necrosis?"  // the default shown in the question dialog
boolean OVERWRITE = false   // true: replace descriptions instead of appending
boolean SET_NAME = true     // also set a short name from the answer
String MODEL = "demo"       // a registered model name or a checkpoint folder
boolean EVIDENCE = false    // true: also add the answer's relevant tiles as "WSI-LLaVA evidence" detections
// -----------------------------------------------------------------------------------------------------

// The shared code (describeSelected, showResult, ...) is wsi_llava_common.groovy, beside this script's file.
def here = binding.variables["qupath.script.file"]  // QuPath names the file of the running script
def common = here ? new File(new File(here as String).parentFile, "wsi_llava_common.groovy") : null
if (common == null || !common.isFile())
    return Dialogs.showErrorMessage("WSI-LLaVA", "wsi_llava_common.groovy must be in the folder of this script; run the script from its file (File > Open in the script editor).")
def wsiLlava = evaluate(common)

def question = Dialogs.showInputDialog("WSI-LLaVA", "Question about the selected annotations", QUESTION)
if (question == null || question.trim().isEmpty())
    return
wsiLlava.showResult(wsiLlava.describeSelected(question.trim(), OVERWRITE, SET_NAME, MODEL, EVIDENCE))
