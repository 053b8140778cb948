"""The layout studio (``ifadapter studio``): compose a layout in the browser and generate it.

It lives under ``evaluation`` because what it adds to a plain front end is the judging of each
instance, and the judges (the toy world's exact verifiers, the benchmark's detector) are the
evaluation's; ``ifadapter`` stays free of them. ``layouts`` (canvas boxes, files), ``judging``
and ``engine`` import no web framework and are tested without a browser; ``app`` is the page.
"""
