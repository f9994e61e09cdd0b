"""``ncutfast label``: DINO keys -> TokenCut / MaskCut -> COCO JSON, resumable and multi-process.

Submodules (nothing heavy is imported until used):
- :mod:`.vit` -- a DINO ViT with the official/timm state-dict keys and key extraction;
- :mod:`.weights` -- safe local loading of checkpoints;
- :mod:`.geometry` -- the tokencut / saliency / maskcut input geometry;
- :mod:`.cut` -- the batched cut and the confidence score;
- :mod:`.post` -- pixel masks, RLE annotations, overlays;
- :mod:`.records` and :mod:`.coco` -- shard records, resume, merge, the output JSON;
- :mod:`.pipeline` -- the run; :mod:`.cli` -- the ``label`` and ``merge`` subcommands;
- :mod:`.demo` -- a generated demo dataset.
"""
