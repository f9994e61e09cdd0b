"""``ncutfast label``: DINO keys -> TokenCut / MaskCut -> COCO JSON, resumable and multi-process.

Submodules (nothing heavy is imported until used):
- :mod:`.vit` -- a DINO ViT with the official/timm state-dict keys and key extraction;
- :mod:`.weights` -- safe local loading of checkpoints;
- :mod:`.geometry` -- the tokencut / saliency / maskcut input geometry;
- :mod:`.cut` -- the batched cut and the confidence score;
- :mod:`.post` -- pixel masks, RLE annotations, overlays;
- :mod:`.records` and :mod:`.coco` -- shard records (validated), resume, merge, the output JSON;
- :mod:`.pipeline` -- the run, in named stages; :mod:`.cli` -- the ``label`` and ``merge`` subcommands;
- :mod:`.errors` -- the user-facing :class:`~.errors.LabelError`; :mod:`._procs` -- helper processes that
  die with the run; :mod:`.machine` -- device, backend and memory checks before any work;
- :mod:`.demo` -- a generated demo dataset.
"""
