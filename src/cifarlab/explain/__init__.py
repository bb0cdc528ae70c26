"""What did the model look at? Class activation maps (via pytorch-grad-cam), selection of
test images worth explaining, faithfulness checks of the maps, and their pictures.

Modules: ``cams`` (maps, six methods), ``layers`` (which layer), ``select`` (which
images), ``faithfulness`` (deletion check, ROAD), ``compare`` (all methods in one table),
``overlay`` (pictures), ``galleries`` (the ``cifarlab explain`` pipeline).
Nothing is imported here so that ``import cifarlab.explain.select`` stays light.
"""
