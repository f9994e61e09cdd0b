"""Drop-in replacements for the original code bases' functions (swap one import, change nothing else).

- ``ncutfast.compat.tokencut.ncut``: TokenCut's ``object_discovery.ncut``.
- ``ncutfast.compat.maskcut.maskcut_forward``: CutLER's ``maskcut.maskcut_forward``.

Each has a batched sibling (``ncut_batch``, ``maskcut_forward_batch``) that solves many images at once.
"""
