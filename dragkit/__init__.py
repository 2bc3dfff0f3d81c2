"""DragKit engine: host-independent drag-editing algorithms in pure torch.

Nothing in this package imports ComfyUI. Modules:

- ``errors``: :class:`DragInputError`, raised for bad user input.
- ``points``: the ``DRAG_POINTS`` value (handle/target pairs in source-image
  pixels), its JSON form, parsing and validation.
- ``geometry``: how image pixels map to latent cells and to the
  half-resolution supervision grid (one shared rule for every node).
- ``schedule``: the DDIM schedule (SD1.5 "leading" spacing) and DDIM steps.
- ``attention``: self-attention layer identities, the key/value cache and the
  record/inject controls that backends call from inside attention.
- ``ddim``: DDIM inversion and KV-injected denoising loops.
- ``backend``: the narrow model interface the loops use.
- ``diffusers_backend``: that interface on a diffusers ``UNet2DConditionModel``
  (imports diffusers lazily).
- ``compositing``: feathered paste of the edited region and the point overlay.
- ``fastdrag``: FastDrag's latent warp, BNNI fills and object moving.
- ``motion``: motion-supervision losses and point tracking on feature maps.
- ``dragdiffusion``: DragDiffusion's latent optimisation loop.
- ``editor_state``: the Drag Points Editor's saved state (points + compact mask).
- ``datasets``: Drag100 and DragBench folders (safe loaders, atomic writers).
- ``metrics``: the evaluator's metrics: DAI, MD (DIFT features) and IF (LPIPS),
  with weights the user supplies.
"""
