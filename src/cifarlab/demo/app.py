"""The ``cifarlab demo`` web app: a Gradio page over a DemoModel, served on localhost.

Three tabs: Classify (upload or example -> top-k label chart and CAM overlays),
Misclassified (the run's most confident mistakes, filterable by class) and Run (headline
numbers and the report's figures). Two events have stable API names for scripts:
``predict`` (image, top_k, show_cam, layer, opacity[, cam]) and ``misclassified`` (count,
show_cam, actual, predicted[, cam]); ``cam``, the CAM method, is optional (Grad-CAM).

Privacy: no share link, telemetry off, the page uses only Gradio's own bundled assets
(fonts included), so it works with no network at all.
"""

from __future__ import annotations

import errno
import signal
import socket
import sys
import time
from typing import Any

from cifarlab.demo.core import MAX_MISCLASSIFIED, MAX_TOP_K, MAX_UPLOAD_BYTES, DemoModel
from cifarlab.config import CAM_METHODS
from cifarlab.demo.handlers import (
    ANY,
    DEFAULT_CAM,
    FIGURES,
    NO_CLASS,
    Handlers,
    confusion_cell,
    confusion_table,
    gradio,
    headline,
    info_markdown,
)
from cifarlab.errors import CifarlabError

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860
DEFAULT_COUNT = 10  # misclassified images shown at first


def build_app(model: DemoModel) -> Any:
    """The app's gradio.Blocks (not launched)."""
    gr = gradio()
    handlers = Handlers(model)
    title = f"cifarlab demo: {model.info.get('model', 'model')}"
    with gr.Blocks(title=title, analytics_enabled=False) as app:
        gr.Markdown(f"# {title}\n{headline(model.info)}")
        with gr.Tabs() as tabs:
            with gr.Tab("Classify", id="classify"):
                _classify_tab(gr, model, handlers)
            with gr.Tab("Misclassified", id="misclassified"):
                mis_inputs, gallery = _misclassified_tab(gr, model)
            with gr.Tab("Run", id="run"):
                table = _run_tab(gr, model, handlers)
        # The gallery fills when the page opens, and again whenever a control changes.
        count, show_cam, actual, predicted, cam = mis_inputs
        gr.on(
            [app.load, count.release, show_cam.change, actual.change, predicted.change, cam.change],
            handlers.misclassified,
            inputs=list(mis_inputs),
            outputs=gallery,
            api_name="misclassified",
        )
        if table is not None:
            _link_confusion(gr, model, table, actual, predicted, tabs)
    return app


def _link_confusion(gr: Any, model: DemoModel, table: Any, actual: Any, predicted: Any, tabs: Any) -> None:
    """A click on an off-diagonal confusion cell shows those mistakes in the Misclassified tab."""

    def pick(evt: Any) -> tuple[Any, Any, Any]:
        cell = confusion_cell(model.classes, evt.index)
        if cell is None:
            gr.Info("Pick an off-diagonal cell: the diagonal holds the correct predictions.")
            return gr.update(), gr.update(), gr.update()
        return cell[0], cell[1], gr.Tabs(selected="misclassified")

    # Gradio passes the clicked cell to a parameter annotated gr.SelectData; set at runtime
    # because this module imports gradio lazily (string annotations would not resolve).
    pick.__annotations__ = {"evt": gr.SelectData}
    table.select(pick, inputs=None, outputs=[actual, predicted, tabs], api_visibility="private")


def _classify_tab(gr: Any, model: DemoModel, handlers: Handlers) -> None:
    n_classes = len(model.classes)
    top_max = min(MAX_TOP_K, n_classes)
    with gr.Row():
        with gr.Column():
            image = gr.Image(label="Image (any size and format)", type="filepath",
                             image_mode=None, sources=["upload"], format="png", height=280, elem_id="upload")
            gr.Markdown("Converted to 32x32 RGB exactly as `cifarlab predict` converts files.")
            if model.examples:
                # Gradio writes the example arrays into its cache as PNG (format="png" above), losslessly.
                names = ", ".join(label for _, label in model.examples)
                gr.Examples([[image_array] for image_array, _ in model.examples], inputs=[image],
                            label=f"Test images, one per class: {names}", cache_examples=False,
                            examples_per_page=len(model.examples))
        with gr.Column():
            top_k = gr.Slider(1, top_max, value=min(3, top_max), step=1, label="Top-k classes")
            show_cam = gr.Checkbox(value=True, label="CAM")
            layer = gr.Dropdown(list(model.layers), value=model.default_layer or model.layers[0], label="Layer to explain")
            cam = gr.Dropdown(list(CAM_METHODS), value=DEFAULT_CAM, label="CAM method")
            opacity = gr.Slider(0.0, 1.0, value=0.5, step=0.05, label="Overlay opacity")
            cam_class = gr.Dropdown([NO_CLASS, *model.classes], value=NO_CLASS, label="Also explain this class")
        with gr.Column():
            label = gr.Label(num_top_classes=top_max, label="Prediction", elem_id="prediction")
            overlay = gr.Image(label="CAM: predicted class", format="png", interactive=False, elem_id="overlay")
            class_overlay = gr.Image(label="CAM: chosen class", format="png", interactive=False, elem_id="class-overlay")
    # preprocess=False: the handlers get the uploaded file itself (see handlers.upload_path).
    gr.on(
        [image.change, top_k.release, show_cam.change, layer.change, opacity.release, cam.change],
        handlers.predict,
        inputs=[image, top_k, show_cam, layer, opacity, cam],
        outputs=[label, overlay],
        api_name="predict",
        preprocess=False,
    )
    gr.on(
        [image.change, cam_class.change, show_cam.change, layer.change, opacity.release, cam.change],
        handlers.class_cam,
        inputs=[image, cam_class, show_cam, layer, opacity, cam],
        outputs=class_overlay,
        api_name="class_cam",
        preprocess=False,
    )


def _misclassified_tab(gr: Any, model: DemoModel) -> tuple[tuple[Any, Any, Any, Any, Any], Any]:
    choices = [ANY, *model.classes]
    with gr.Row():
        count = gr.Slider(1, MAX_MISCLASSIFIED, value=DEFAULT_COUNT, step=1, label="How many")
        show_cam = gr.Checkbox(value=False, label="CAM (predicted | actual class)")
        actual = gr.Dropdown(choices, value=ANY, label="Actual class")
        predicted = gr.Dropdown(choices, value=ANY, label="Predicted class")
        cam = gr.Dropdown(list(CAM_METHODS), value=DEFAULT_CAM, label="CAM method")
    gallery = gr.Gallery(label="Most confidently misclassified test images: actual / predicted (p)", columns=5,
                         format="png", object_fit="contain", elem_id="misclassified-gallery")
    return (count, show_cam, actual, predicted, cam), gallery


def _run_tab(gr: Any, model: DemoModel, handlers: Handlers) -> Any:
    """Headline numbers, the report's figures and a clickable confusion table (returned, or None)."""
    figures = handlers.figures()
    with gr.Row():
        with gr.Column(scale=2):
            gr.Markdown(info_markdown(model.info), elem_id="run-info")
        with gr.Column(scale=3):
            if "curves" in figures:
                gr.Image(figures["curves"], label=FIGURES["curves"], format="png", interactive=False, height=320)
            else:
                gr.Markdown("_This source has no training history to plot._")
    with gr.Row():
        for key in ("per_class", "confusion"):
            if key in figures:
                gr.Image(figures[key], label=FIGURES[key], format="png", interactive=False, height=420)
    confusion = (getattr(model, "metrics", None) or {}).get("confusion")
    if not confusion:
        return None
    return gr.Dataframe(
        confusion_table(model.classes, confusion),
        headers=["actual \\ predicted", *model.classes],
        label="Confusion counts: click a cell to see those mistakes in the Misclassified tab",
        interactive=False,
        elem_id="confusion-table",
    )


def check_port(host: str, port: int) -> None:
    """Raise a one-line CifarlabError unless ``host:port`` can be listened on.

    Checked before Gradio starts, whose own failure is a long traceback. SO_REUSEADDR as
    uvicorn sets it: a port left in TIME_WAIT by a stopped demo counts as free.
    """
    if not 1 <= port <= 65535:
        raise CifarlabError(f"--port must be in 1..65535, got {port}")
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    except socket.gaierror:
        raise CifarlabError(f"unknown host {host!r}; pass --host 127.0.0.1") from None
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise CifarlabError(f"port {port} on {host} is in use; pass --port") from None
            raise CifarlabError(f"cannot listen on {host}:{port}: {exc.strerror or exc}; pass --host/--port") from None


def launch(model: DemoModel, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT) -> tuple[Any, str]:
    """Start the app in background threads; return (the Blocks, its URL). ``close()`` it to stop."""
    check_port(host, port)
    app = build_app(model)
    try:
        _, url, _ = app.launch(
            server_name=host,
            server_port=port,
            share=False,
            prevent_thread_lock=True,
            quiet=True,  # we print the one URL line ourselves (and no "set share=True" hint)
            max_file_size=MAX_UPLOAD_BYTES,
            ssr_mode=False,  # no Node server
            mcp_server=False,
            pwa=False,
            enable_monitoring=False,
            run_history=False,  # else the browser keeps the calls (and offers to upload them to a HF bucket)
            footer_links=["api", "gradio", "settings"],
        )
    except OSError:  # taken between check_port and now
        raise CifarlabError(f"port {port} on {host} is in use; pass --port") from None
    return app, url


def serve(model: DemoModel, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, *, block: bool = True) -> str:
    """Serve the app on ``host:port`` and print its URL; return the URL.

    With ``block`` (the CLI), wait until Ctrl-C and then shut the server down cleanly;
    without, return at once and leave the server running in background threads.
    """
    app, url = launch(model, host, port)
    print(f"cifarlab demo: serving {url} (Ctrl-C to stop)", flush=True)
    if host not in ("127.0.0.1", "localhost", "::1"):
        print(f"cifarlab demo: listening on {host}: other machines on the network can open it", flush=True)
    if not block:
        return url
    # A process started with SIGINT ignored (e.g. by `cmd &` in a script: POSIX shells
    # ignore it in background jobs) inherits that, and Python then installs no
    # KeyboardInterrupt handler: Ctrl-C / `kill -INT` would never stop the server.
    # `cifarlab train` installs its own handlers for the same reason (guards.py).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        while app.is_running:
            time.sleep(0.2)
    except KeyboardInterrupt:
        print("cifarlab demo: stopped", file=sys.stderr, flush=True)
    finally:
        app.close(verbose=False)
    return url
