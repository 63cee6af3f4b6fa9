"""Built-in metrics: one small module per metric family.

* :mod:`.interpolation` - loss/accuracy along each pair's segment on a grid of a.
* :mod:`.floor`        - valley floor (refined minimum), convexity, height above the floor.
* :mod:`.geometry`     - step length, distance from the first record, cosine of consecutive updates, lr.
* :mod:`.barriers`     - barriers along the valley floor between floor points k records apart.
"""
