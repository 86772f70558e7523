"""The synthetic slide world: H&E-like pyramidal slides whose every label is visible in the pixels.

Used to train and check the demo model, in tests and in benchmarks. Slides are 256-px tiles at
0.5 µm/px (128 µm per tile); class regions span several tiles, so whole tiles are pure.

Tissue classes (texture drawn per pixel from level-0 coordinates, see ``render``):

* **tumour** – two patterns. *Glands* (adenocarcinoma): rings of cuboidal cells, one nucleus each,
  around open lumens, in fibrous stroma. *Sheets* (squamous cell carcinoma): nests of large polygonal
  cells with eosinophilic cytoplasm, distinct borders and one nucleus each, thin fibrous septa, and
  keratin pearls (concentric eosinophilic whorls without nuclei).
* **stroma** – wavy pink collagen fibres with sparse elongated spindle nuclei.
* **necrosis** – pale mottled pink amorphous areas with small karyorrhectic fragments.
* **lymphocytes** – dense small round very dark nuclei.
* **fat** – large empty polygonal cells with thin pink membranes.
* **background** – near-white glass around an irregular tissue section.

Slide-level rules (``labels.SlideLabels``):

* diagnosis ``adenocarcinoma`` ⇔ tumour drawn as glands; ``squamous cell carcinoma`` ⇔ tumour drawn
  as sheets/nests with keratin pearls; ``no tumour`` ⇔ no tumour class drawn (grade
  ``not applicable``).
* grade (tumours only): **G1** glands regular and round / many pearls, small uniform nuclei;
  **G2** irregular, distorted glands / fewer pearls, nuclei x1.25 with moderate pleomorphism;
  **G3** mostly solid sheets with few glands (40 % keep a lumen) / few pearls, nuclei x1.55 with
  marked pleomorphism and hyperchromasia, and **necrosis present only in G3**.
* stroma is on every slide; lymphocytic infiltrate and fat are each drawn on about half the slides.
* diagnoses cycle in seeded blocks of three, grades cycle within each tumour type (balanced).
* stain colour is jittered per slide (stain vectors and strengths), so colour alone does not tell
  classes apart across slides; morphology does.

Textures are sized in level-0 pixels for 0.5 µm/px (a nucleus ~12-20 px, a gland ~100 px); another
``mpp`` changes the recorded resolution, not the drawing.

``generate_world`` writes slides, QuPath GeoJSON ground truth, reports and WSI-Bench-format
questions (see ``world``). Same seed, same pixels and same questions.
"""

from __future__ import annotations

from wsi_llava.synth.labels import SlideLabels, assign_labels
from wsi_llava.synth.world import SlideEntry, WorldManifest, generate_world, load_manifest

__all__ = ["SlideEntry", "SlideLabels", "WorldManifest", "assign_labels", "generate_world", "load_manifest"]
