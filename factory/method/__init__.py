"""The method: model-facing code, one module per step of concept distillation (torch, diffusers; no Ray).

loading      a diffusers pipeline by short name, local directory or hub id
families     what differs between SD 1.x/2.x, SDXL and SD3: detection, text, the denoiser call
prompts      prompt embeddings and the concept words' token positions
geometry     one image geometry: resize the long side, pad, record the valid region
attention    the cross-attention capture on every attn2 layer, or SD3's joint attention (paper Step 1)
probe        the paper's attention probe of real images (Step 1)
synthesis    text-to-image denoising with in-loop attention capture (Step 5)
masks        GMM / Otsu thresholding and the 3x3 majority filter (Step 2)
schedulers   the samplers by name, on the model's own noise schedule (DDPM or rectified flow)
inpaint      blend-then-step background inpainting (Step 4)
refine       the refined mask: rule(|x - background|) AND M_pre (Step 4b)
distiller    `Distiller`: the steps above, in order, for one batch of samples
"""
