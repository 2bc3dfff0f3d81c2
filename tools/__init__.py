"""Development tools of DragKit (the user-facing runner and evaluator live in ``dragrun/``).

- ``tiny_models`` (with ``tiny_sdxl_sd2``, ``tiny_inpaint``, ``tiny_flux``,
  ``tiny_wan``, ``tiny_sam3``): tiny seeded models and checkpoints that
  ComfyUI's loaders load (stand-ins for real weights: the tests' models, and
  the runner's pipeline check without ``--checkpoint``).
- ``sd15_random`` / ``sdxl_random``: real-size random checkpoints for the GPU check.
- ``make_workflows`` (with ``workflow_build``): regenerates ``workflows/``.
- ``gpu_check``, ``capture_check``, ``comfy_vram``: the GPU check and its helpers.
- ``ci_junit``: CI's check of the test report.

Never imported by the nodes.
"""
