"""Detection components: boxes, anchors, NMS, RoIAlign, and the Mask / Keypoint R-CNN models."""
