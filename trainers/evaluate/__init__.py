"""Evaluation as the paper does it: pixel-pooled ACC / IoU / mIoU on labelled sets.

metrics        pooled segmentation metrics and attention AUC-ROC
score          `trainers evaluate`: a student, a mask folder or GrabCut on a labelled set
method_masks   `trainers evaluate-masks`: the method's own masks (M_pre, refined M) on a labelled split
"""
