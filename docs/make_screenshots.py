"""Make the screenshots of docs/quickstart.md (needs a display: run it under Xvfb).

    xvfb-run -a -s "-screen 0 1600x1000x24 +extension GLX" python docs/make_screenshots.py

Opens napari at 1600 x 1000 with the sample volume and the Train and Export docks, opened the
way the Plugins menu opens them (``add_plugin_dock_widget``), "paints" two axial
slices by copying the reference labels into the 'painted' layer (what painting with the
brush does), marks a third painted slice for validation, trains Mean Teacher for a short
budget and saves ``docs/images/train_dock.png`` with the prediction showing.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PAINTED = (30, 50)
VALIDATION = 44
SHOWN = 40  # the slice on screen: not painted, so what shows is the prediction


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE / "images" / "train_dock.png")
    parser.add_argument("--iterations", type=int, default=120)
    parser.add_argument("--method", default="mean_teacher")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    import napari
    from qtpy.QtWidgets import QApplication, QWidget

    from napari_semicl.widgets.launch import EXPORT_DOCK_NAME, TRAIN_DOCK_NAME, add_sample_layers

    viewer = napari.Viewer(title="napari-semicl")
    viewer.window._qt_window.resize(1600, 1000)
    image, reference, painted = add_sample_layers(viewer)
    train_dock, train = viewer.window.add_plugin_dock_widget("napari-semicl", TRAIN_DOCK_NAME)
    viewer.window.add_plugin_dock_widget("napari-semicl", EXPORT_DOCK_NAME)  # a tab beside Train
    QApplication.processEvents()
    train_dock.raise_()
    train.set_pair(0, image, painted)
    for s in (*PAINTED, VALIDATION):
        painted.data[s] = reference.data[s]
    painted.refresh()

    train.method_combo.setCurrentText(args.method)
    train.iterations_spin.setValue(args.iterations)
    train.refresh_spin.setValue(20)
    train.patch_spin.setValue(64)
    train.background_check.setChecked(True)  # the copied slices are complete
    run_dir = Path(tempfile.mkdtemp(prefix="semicl-screenshot-"))
    train.run_folder_edit.setText(str(run_dir))
    viewer.dims.set_current_step(0, VALIDATION)
    train.mark_validation()
    train.refresh_classes()
    for row, name in enumerate(("background", "grey matter", "white matter", "CSF")):
        train.class_table.item(row, 1).setText(name)

    if not train.start_training():
        raise SystemExit("training did not start (see the notification above)")
    t0 = time.monotonic()
    while train.is_training and time.monotonic() - t0 < 900:
        QApplication.processEvents()
        time.sleep(0.02)
    viewer.dims.set_current_step(0, SHOWN)
    painted.selected_label = 1
    viewer.layers.selection.active = painted
    for toast in viewer.window._qt_window.findChildren(QWidget):
        if type(toast).__name__ == "NapariQtNotification":  # e.g. the PyQt5 deprecation toast
            toast.close()
    for _ in range(20):  # let the canvas draw
        QApplication.processEvents()
        time.sleep(0.05)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    viewer.window._qt_window.grab().save(str(args.out))
    logging.info("saved %s (trained %d steps in %.0f s)", args.out, train.trainer.step, time.monotonic() - t0)
    viewer.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
