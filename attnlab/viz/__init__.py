"""Pictures: CAM overlays with boxes, attention gates, TDAM per-step maps (``attnlab show``)."""
