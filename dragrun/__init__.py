"""DragKit's headless runner: the shipped workflows outside the ComfyUI window, one sample or a batch.

- ``run_workflow``: the runner (``bash scripts/run_workflow.sh`` runs it);
  ``run_progress``: its progress lines; ``batch_layout``: its batch output
  folder, shared with the evaluator; ``refusals``: the workflows it refuses.
- ``distribute``: a batch shared out over several workers, on servers that
  are already running (``servers``, ``--server``) or on Ray actors
  (``ray_workers``, ``--ray``).
- ``workflow_format``: a UI-format workflow JSON to an API prompt.
- ``comfy_host``: ComfyUI (from ``COMFYUI_PATH``) as a headless server with
  this pack installed, or in-process (the tests' host too).
- ``evaluate`` (with ``eval_report``): DAI / MD / IF of a method's results
  over a benchmark folder, a table per method and a before/after grid.

Without ``--checkpoint`` the runner builds the tiny test checkpoints of
``tools/`` (a pipeline check). Never imported by the nodes (the pack's
``__init__.py`` loads ``nodes/`` only).
"""
