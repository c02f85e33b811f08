"""Detectors: morphology heads and the Mask R-CNN strong-lens finder on the LVM, and lens alerts.

The detector service (``galsift detect``) consumes ``tiles.embedded``, scores each tile, upserts
``detections``, raises alerts for new lens candidates and publishes them on ``alerts.lens``.
"""
