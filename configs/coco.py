"""COCO detection, instance segmentation and keypoints with non-local blocks (paper section 6).

    python main.py --config configs/coco.py:shapes --workdir DIR          # offline, CPU
    python main.py --config configs/coco.py:maskrcnn_r50_nl1 --workdir DIR \
        --config.manual_dir=/data/coco --config.init_from=~/ckpt/r50_in1k

Variants:

* ``maskrcnn_{r50,r101}[_nl1]``: Mask R-CNN R-FPN, with one non-local block
  right before the last res4 block (the paper's Table 5);
* ``keypointrcnn_{r50,r101}[_nl4,_nl5]``: Keypoint R-CNN R-FPN, 4 non-local
  blocks in the keypoint head (``_nl4``), plus 1 in res4 (``_nl5``) (Table 6);
* ``maskrcnn_{r50,r101}_rm`` / ``shapes_rm``: the same detector with the
  "2fc + RM" box head of Hu et al. (CVPR 2018): one object relation module
  after each fully connected layer (``box_relation_modules=1``; that paper's
  own FPN runs used Faster R-CNN, its recipe is not reproduced here);
* ``shapes`` / ``figures``: tiny detectors on our generated data sets
  (``shapes_detection``: shapes with boxes and masks; stick figures with 7
  keypoints), trained from scratch on a CPU.

The paper does not state its COCO schedule; the recipe is Detectron's
end-to-end 1x (``configs/12_2017_baselines/e2e_mask_rcnn_R-50-FPN_1x.yaml``):
batch 16, lr 0.02, momentum 0.9, weight decay 1e-4, 90k iterations with the
lr divided by 10 at 60k and 80k, linear warm-up over 500 iterations from 1/3,
shorter side 800 (keypoints: 640-800), longer side at most 1333, flips.
The network is torchvision's (stride on the 3x3 convolution, 1/sqrt(d)
non-local scale...): torchvision's COCO checkpoints convert one to one
(``python -m nonlocal_jax.convert --from torchvision --model maskrcnn_r50_fpn``).
Frozen: every BN (folded, ``norm='affine'``), the stem and res2, as
torchvision's ``trainable_backbone_layers=3`` and Detectron's FREEZE_AT 2.
"""

import ml_collections

from configs import common
from nonlocal_jax.data.coco_detection import COCO_KEYPOINT_NAMES
from nonlocal_jax.data.detection_features import flip_permutation
from nonlocal_jax.data.shapes_detection import KEYPOINT_NAMES as FIGURE_KEYPOINT_NAMES
from nonlocal_jax.data.shapes_detection import SHAPE_NAMES
from nonlocal_jax.preprocessing import detection

FROZEN = r"^backbone/(stem|stages/0)/|/norm/"
COCO_RUNS = {
    **{f"maskrcnn_{depth}{nl}": f"maskrcnn_{depth}_fpn{nl}" for depth in ("r50", "r101")
       for nl in ("", "_nl1")},
    **{f"keypointrcnn_{depth}{nl}": f"keypointrcnn_{depth}_fpn{nl}" for depth in ("r50", "r101")
       for nl in ("", "_nl4", "_nl5")},
}
GENERATED_RUNS = ("shapes", "figures")
# "2fc + RM" variants: run -> the run whose box head gets the relation modules.
RELATION_RUNS = {"maskrcnn_r50_rm": "maskrcnn_r50", "maskrcnn_r101_rm": "maskrcnn_r101",
                 "shapes_rm": "shapes"}


def _detection_config(dataset: str, model: str, num_classes: int, keypoint_names=()):
  config = common.base_config()
  config.task = "detection"
  config.modality = "detection"
  config.dataset = dataset
  config.train_split = "train"
  config.eval_split = "validation"
  config.num_classes = num_classes  # with the background
  config.input = detection.default_config()
  config.input.num_keypoints = len(keypoint_names)
  config.input.masks = not keypoint_names
  config.input.keypoint_flip = flip_permutation(keypoint_names) if keypoint_names else ()
  config.model.name = model
  config.frozen_params = FROZEN
  config.weight_decay = 1e-4
  config.nesterov = False
  config.momentum = 0.9
  return config


def get_config(variant: str = "shapes") -> ml_collections.ConfigDict:
  if variant not in COCO_RUNS and variant not in GENERATED_RUNS and variant not in RELATION_RUNS:
    raise ValueError(f"unknown variant {variant!r}; one of "
                     f"{', '.join([*GENERATED_RUNS, *COCO_RUNS, *RELATION_RUNS])}")
  if variant in RELATION_RUNS:
    config = get_config(RELATION_RUNS[variant])
    config.model.kwargs.box_relation_modules = 1
    return config
  if variant in GENERATED_RUNS:
    keypoints = FIGURE_KEYPOINT_NAMES if variant == "figures" else ()
    classes = 1 if keypoints else len(SHAPE_NAMES)
    config = _detection_config(f"shapes_detection/{variant}",
                               "keypointrcnn_tiny" if keypoints else "maskrcnn_tiny",
                               classes + 1, keypoints)
    # The generated images are 96 or 128 pixels a side: no resizing below 128, no padding above.
    config.input.update(train_min_sizes=(128,), max_size=128, test_min_size=128,
                        pad_size=(128, 128), max_objects=8)
    config.model.kwargs = ml_collections.ConfigDict(dict(
        rpn_pre_nms_top_n_train=500, rpn_post_nms_top_n_train=200,
        rpn_pre_nms_top_n_test=300, rpn_post_nms_top_n_test=100,
        box_batch_size_per_image=64, box_detections_per_img=20))
    config.frozen_params = r"/norm/"  # trained from scratch: only the folded norms stay fixed
    config.batch_size = 8
    config.eval_batch_size = 8
    config.num_train_steps = 1200
    config.learning_rate = 0.02
    config.schedule = "cosine"
    config.warmup_steps = 50
    config.warmup_init_lr = 0.002
    config.weight_decay = 0.0
    config.log_every_steps = 100
    config.checkpoint_every_steps = 600
    return common.expose_model_arguments(config)

  keypoints = COCO_KEYPOINT_NAMES if variant.startswith("keypoint") else ()
  config = _detection_config(
      "coco_detection/" + ("person_keypoints" if keypoints else "instances"),
      COCO_RUNS[variant], 2 if keypoints else 81, keypoints)
  config.manual_dir = "~/data/coco"
  if keypoints:
    config.input.train_min_sizes = (640, 672, 704, 736, 768, 800)
  else:
    # Each mask as a 56x56 patch of its box (1.25 MB per image for 100 objects, not 180 MB
    # at 1344x1344); the 28x28 targets then differ from full-resolution ones by ~0.003-0.01
    # on average (nonlocal_jax/detection/losses.py mask_targets_from_patches).
    config.input.mask_patch_size = 56
  config.batch_size = 16
  config.eval_batch_size = 8
  config.learning_rate = 0.02
  config.schedule = "step"
  config.lr_steps = (60_000, 80_000)
  config.num_train_steps = 90_000
  config.warmup_steps = 500
  config.warmup_init_lr = 0.02 / 3
  config.checkpoint_every_steps = 5000
  config.log_every_steps = 20
  return common.expose_model_arguments(config)
