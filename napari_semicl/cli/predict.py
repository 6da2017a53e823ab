"""``napari-semicl predict``: a checkpoint's mask (and entropy map) of an image, a folder of
tiles or a whole-slide image; ``--suggest N`` ranks the slices to annotate next."""

from __future__ import annotations

import json
import logging

from ..engine import load_predictor, pick_device
from ..engine.apply import Predictor, predict_file
from .common import Command, add_device_option


def arguments(p) -> None:
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--image", required=True)
    p.add_argument("--out", required=True, help="mask file (.nii.gz, .nii, .tif; for a slide .ome.tif or .zarr)")
    p.add_argument("--entropy", help="also write the normalised entropy map here")
    p.add_argument("--suggest", type=int, default=0, metavar="N",
                   help="also print (JSON) the N slices with the highest mean entropy: where to annotate next")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.add_argument("--largest-component", action="store_true",
                   help="keep only the largest 3D connected piece of each class (predict.largest_component; "
                        "for a structure that is one piece)")
    p.add_argument("--adapt-batch-norm", action="store_true",
                   help="re-estimate the batch-norm statistics on each image before predicting it "
                        "(predict.adapt_batch_norm; for a stain or intensity unlike the training images')")
    add_device_option(p)


def cmd_predict(args) -> int:
    from ..io.wsi import is_slide

    model, cfg = load_predictor(args.checkpoint, device=pick_device(args.device))
    if args.largest_component:
        cfg.predict.largest_component = True
    if args.adapt_batch_norm:
        cfg.predict.adapt_batch_norm = True
    if is_slide(args.image):
        from .slides import predict_slide

        if cfg.predict.adapt_batch_norm:
            logging.getLogger(__name__).warning(
                "predict.adapt_batch_norm is not applied to whole-slide images: the slide is predicted without it")
        return predict_slide(args, model, cfg)
    result = predict_file(
        Predictor(model, cfg, next(model.parameters()).device, str(args.checkpoint)), args.image, args.out,
        entropy=args.entropy, with_entropy=bool(args.suggest), overwrite=args.overwrite,
    )
    pred = result.prediction
    print(f"mask written to {result.mask}")
    if result.entropy_map is not None:
        print(f"entropy map written to {result.entropy_map}")
    if args.suggest:
        from ..analysis import rank_slices, slice_means

        ranked = rank_slices(slice_means(pred.entropy, cfg.data.axis), top=args.suggest)
        print(json.dumps({"axis": cfg.data.axis, "annotate_next": [
            {"slice": s.slice_index, "mean_entropy": round(s.entropy, 6)} for s in ranked]}, indent=2))
    return 0


COMMAND = Command("predict", "predict an image with a checkpoint", arguments, cmd_predict)
