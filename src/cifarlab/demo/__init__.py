"""``cifarlab demo``: an interactive web app for a trained run, and its Hugging Face Space export.

Modules: ``core`` (:class:`~cifarlab.demo.core.DemoModel`: everything the app computes,
without gradio), ``sources`` (run directory / checkpoint / exported folder -> model and
data), ``images`` (upload conversion and CAM overlays), ``layers`` (which layers to
explain), ``pool`` (the misclassified test images and the examples), ``store`` (the
exported folder's ``demo_data.npz``), ``app`` (the gradio UI) and ``export`` (the Space
folder). Nothing is imported here, so importing the package never pulls in gradio.
"""
