"""napari dock widgets of napari-busseg, one module per widget.

The manifest (``busseg/napari.yaml``) points at each module directly, so importing this package
imports nothing: opening the Scan browser does not load torch, and opening the segment widget
does not import the browser.

- :mod:`busseg._widgets.browser`: ``BusiBrowserWidget`` ("Scan browser")
- :mod:`busseg._widgets.segment`: ``SegmentWidget`` ("Segment lesions")
- :mod:`busseg._widgets.finetune`: ``FineTuneWidget`` ("Fine-tune")
- :mod:`busseg._widgets._common`: small helpers the widgets share (notifications, layer lookup,
  layer names, a yes/no question)
"""
