"""What did the model look at? Grad-CAM (via Captum), selection of test images worth
explaining, a faithfulness check of the maps, and their pictures.

Modules: ``gradcam`` (maps), ``select`` (which images), ``faithfulness`` (deletion
check), ``overlay`` (pictures), ``galleries`` (the ``cifarlab explain`` pipeline).
Nothing is imported here so that ``import cifarlab.explain.select`` stays light.
"""
