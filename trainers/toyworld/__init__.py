"""The embedded toyworld model's recipe and its measurements.

pretrain            `trainers pretrain-toyworld`: VAE, text encoder and UNet from scratch
pretrain_bench      steps/s of the real pretraining step on this machine's device
quality             the model card's measurements (attention AUC, GMM IoU, sample grids)
classifier          the shape classifier behind "concept accuracy"
compare_attention   in-loop attention versus the paper's probe
tables              the paper's Tables 1-2 end to end in toyworld (`trainers toyworld-tables`)
"""
