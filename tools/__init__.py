"""Developer tools of DragKit that need more than the engine.

- ``comfy_host``: run a real ComfyUI (from ``COMFYUI_PATH``) in-process or
  as a headless server with this pack installed.
- ``tiny_models``: tiny seeded diffusers models and a tiny SD1.5 checkpoint
  that ComfyUI's CheckpointLoaderSimple loads (stand-ins for real weights).
- ``workflow_format`` / ``workflow_build``: UI-format workflow JSON to an API
  prompt, and back from a short graph description.
- ``run_workflow``: the headless runner (``batch_layout``: its batch output
  folder, shared with the evaluator); ``make_workflows``: regenerates
  ``workflows/``.
- ``evaluate`` (with ``eval_report``): DAI / MD / IF of a method's results
  over a benchmark folder, a table per method and a before/after grid.

Used by the tests, the benchmark and the headless runner; never imported by
the nodes.
"""
