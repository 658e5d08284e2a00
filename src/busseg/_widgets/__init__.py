"""napari dock widgets of napari-busseg: thin views, one module per thing a person does.

The manifest (``busseg/napari.yaml``) points at each widget module directly, so importing this
package imports nothing: opening the Scan browser does not load torch, and opening the segment
widget does not import the browser. The widgets never look each other up: what they share (the
annotation session, the checkpoint in use, the inference settings, the keyboard actions) is the
viewer's :class:`busseg.state.ViewerState`; layer names and metadata are :mod:`busseg.layers`.

- :mod:`busseg._widgets.browser`: ``ScanBrowserWidget`` ("Scan browser"; ``BusiBrowserWidget``
  is its deprecated name), with its parts :mod:`~busseg._widgets.browser_cases` (case list,
  statuses, recording), :mod:`~busseg._widgets.browser_layers` (the open case's layers),
  :mod:`~busseg._widgets.browser_predict` (prediction on open, prefetch),
  :mod:`~busseg._widgets.browser_learning` (learning as you go),
  :mod:`~busseg._widgets.browser_ranking` (ranking by uncertainty) and
  :mod:`~busseg._widgets.browser_keys` (keyboard shortcuts)
- :mod:`busseg._widgets.segment`: ``SegmentWidget`` ("Segment lesions"), with
  :mod:`~busseg._widgets.prompts` (box and click prompts) and
  :mod:`~busseg._widgets.segment_results` (output layers, Dice row)
- :mod:`busseg._widgets.finetune`: ``FineTuneWidget`` ("Fine-tune")
- :mod:`busseg._widgets._common`: small helpers the widgets share (notifications, a worker
  for generator jobs, scroll areas, a yes/no question)
"""
