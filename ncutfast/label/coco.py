"""The COCO-style output JSON (class-agnostic, one category "fg"), in the layout of CutLER's pseudo-labels.

Differences from CutLER's file, on purpose:
- ``images[].width`` is the image width and ``height`` its height. CutLER's ``maskcut.py`` swaps them (it
  passes ``(h, w, 3)`` where ``(w, h)`` is read), so every non-square image in its released JSON has them
  the wrong way round; annotations' ``segmentation.size`` ([H, W]) was and is right.
- Every annotation carries confidence numbers from the cut: ``score`` (relative eigengap
  ``1 - lambda2 / lambda3``), ``ncut`` (lambda2), ``eigengap`` (lambda3 - lambda2), plus ``tau`` and
  ``mask_index``. pycocotools ignores unknown keys, and ``score`` makes the file usable as detections too.
- ``date_captured`` is empty and ``info`` holds the settings but no timestamp, so identical inputs give a
  byte-identical file.
"""

from __future__ import annotations

__all__ = ["CATEGORIES", "LICENSES", "build_coco"]

CATEGORIES = [{"id": 1, "name": "fg", "supercategory": "fg"}]
LICENSES = [{"id": 1, "name": "Apache License 2.0", "url": "https://www.apache.org/licenses/LICENSE-2.0"}]


def build_coco(batches: list[dict], info: dict) -> dict:
    """Assemble the JSON from batch records ordered by batch id.

    Args:
        batches: records as written by the pipeline, each ``{"batch": j, "images": [...], "errors": [...]}``
            where an image is ``{"index", "file_name", "width", "height", "annotations": [...]}``.
        info: the ``info`` block (settings); ``skipped_images`` (unreadable files) is added.

    Image ids are 1-based in dataset order; annotation ids are 1-based in image order then mask order.
    """
    images, annotations = [], []
    skipped = 0
    for rec in batches:
        skipped += len(rec.get("errors", []))
        for img in rec["images"]:
            image_id = len(images) + 1
            images.append({
                "id": image_id,
                "file_name": img["file_name"],
                "width": img["width"],
                "height": img["height"],
                "date_captured": "",
                "license": 1,
                "coco_url": "",
                "flickr_url": "",
            })
            for ann in img["annotations"]:
                annotations.append({"id": len(annotations) + 1, "image_id": image_id, **ann})
    return {
        "info": {**info, "skipped_images": skipped},
        "licenses": LICENSES,
        "categories": CATEGORIES,
        "images": images,
        "annotations": annotations,
    }
