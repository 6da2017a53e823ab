"""Make the screenshots of docs/review.md on real data (needs a display: run under Xvfb).

    xvfb-run -a -s "-screen 0 1600x1200x24" python docs/make_review_screenshots.py \\
        --image ../shared/data/la/train/06SR5RBREL16DQ6M8LWS.nii.gz

Opens napari with the Train dock and the four review docks, reveals ``--reveal`` slices of
the image's ``_gt`` reference in a 'painted' layer (what painting those slices with the
brush does), trains Mean Teacher for ``--iterations`` steps, then raises each review dock
in turn and saves ``docs/images/review_*.png``.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _spin(seconds: float) -> None:
    from qtpy.QtWidgets import QApplication

    end = time.monotonic() + seconds
    while time.monotonic() < end:
        QApplication.processEvents()
        time.sleep(0.02)


def _close_toasts(viewer) -> None:
    from qtpy.QtWidgets import QWidget

    for toast in viewer.window._qt_window.findChildren(QWidget):
        if type(toast).__name__ == "NapariQtNotification":
            toast.close()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", type=Path, required=True)
    parser.add_argument("--reference", type=Path, help="default: the image's _gt file")
    parser.add_argument("--out-dir", type=Path, default=HERE / "images")
    parser.add_argument("--iterations", type=int, default=300)
    parser.add_argument("--reveal", type=int, default=3)
    parser.add_argument("--method", default="mean_teacher")
    parser.add_argument("--points", type=int, default=1500, help="t-SNE points")
    parser.add_argument("--threshold", type=float, default=0.8, help="certainty threshold of the pseudo-labels")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    import napari
    import numpy as np

    from napari_semicl.data.reveal import choose_reveal_slices, reveal_slices
    from napari_semicl.io import read_image, read_labels
    from napari_semicl.widgets.curves_widget import CurvesWidget
    from napari_semicl.widgets.feature_plot import FeaturePlotWidget
    from napari_semicl.widgets.review_widget import ReviewWidget
    from napari_semicl.widgets.suggest_widget import SuggestWidget
    from napari_semicl.widgets.train_widget import TrainWidget

    ref_path = args.reference or args.image.with_name(args.image.name.replace(".nii.gz", "_gt.nii.gz"))
    img = read_image(args.image)
    ref = read_labels(ref_path).data
    viewer = napari.Viewer(title="napari-semicl review")
    viewer.window._qt_window.resize(1580, 1150)
    image = viewer.add_image(img.data, name=img.name, scale=img.scale, metadata=img.metadata)
    shown = choose_reveal_slices(ref, args.reveal, 0)
    painted = viewer.add_labels(reveal_slices(ref, shown, 0).astype(np.uint16), name="painted",
                                scale=img.scale, metadata=dict(img.metadata))
    train = TrainWidget(viewer)
    viewer.window.add_dock_widget(train, name="Train (semi-supervised)")
    train.set_pair(0, image, painted)
    train.method_combo.setCurrentText(args.method)
    train.iterations_spin.setValue(args.iterations)
    train.refresh_spin.setValue(max(args.iterations // 3, 1))
    train.patch_spin.setValue(96)
    train.background_check.setChecked(True)
    train.run_folder_edit.setText(tempfile.mkdtemp(prefix="semicl-review-shot-"))
    docks = {}
    for cls, title in ((ReviewWidget, "Review pseudo-labels"), (SuggestWidget, "Annotate next"),
                       (FeaturePlotWidget, "Feature space (t-SNE)"), (CurvesWidget, "Training curves")):
        docks[cls.__name__] = cls(viewer, train)
        viewer.window.add_dock_widget(docks[cls.__name__], name=title, tabify=True)
    docks["SuggestWidget"].disagreement_check.setChecked(True)
    viewer.dims.set_current_step(0, shown[len(shown) // 2])
    train.mark_validation()  # the middle revealed slice: live Dice
    train.refresh_classes()
    t0 = time.monotonic()
    if not train.start_training():
        raise SystemExit("training did not start (see the notification above)")
    while train.is_training and time.monotonic() - t0 < 1500:
        _spin(0.1)
    logging.info("trained %d steps in %.0f s", train.trainer.step, time.monotonic() - t0)
    _spin(2.0)

    def shoot(name: str, dock) -> None:
        dock.parent().raise_() if dock.parent() is not None else None
        _close_toasts(viewer)
        _spin(1.0)
        view = getattr(dock, "view", None)  # figures are drawn in the render thread
        while view is not None and view.busy:
            _spin(0.1)
        path = args.out_dir / f"review_{name}.png"
        viewer.window._qt_window.grab().save(str(path))
        logging.info("saved %s", path)

    review, suggest = docks["ReviewWidget"], docks["SuggestWidget"]
    feature, curves = docks["FeaturePlotWidget"], docks["CurvesWidget"]
    args.out_dir.mkdir(parents=True, exist_ok=True)
    # 1. pseudo-labels at certainty --threshold on the unpainted slice with the most
    # foreground in the reference (the structure is in view), entropy beside
    review.set_threshold(args.threshold)
    review.refresh_pseudo_labels(0, wait=True)
    area = (ref != 0).reshape(ref.shape[0], -1).sum(1)
    area[list(shown)] = -1
    top = int(np.argmax(area))
    viewer.dims.set_current_step(0, top)
    viewer.reset_view()
    viewer.layers[f"{image.name} prediction"].visible = False
    shoot("pseudo_labels", review)
    review.accept_slice(top)
    shoot("accepted", review)
    # 2. entropy map
    viewer.layers[f"{image.name} entropy"].visible = True
    viewer.layers[f"{image.name} pseudo-labels"].visible = False
    shoot("entropy", review)
    viewer.layers[f"{image.name} entropy"].visible = False
    viewer.layers[f"{image.name} pseudo-labels"].visible = True
    # 3. annotate next
    shoot("suggest", suggest)
    # 4. t-SNE (computed by the idle trainer in a worker)
    feature.points_spin.setValue(args.points)
    feature.compute()
    t1 = time.monotonic()
    while feature.busy and time.monotonic() - t1 < 600:
        _spin(0.1)
    logging.info("t-SNE in %.1f s", time.monotonic() - t1)
    shoot("tsne", feature)
    # 5. curves
    curves.redraw(wait=True)
    shoot("curves", curves)
    viewer.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
