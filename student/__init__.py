"""The diffusion student: its model (`model`), KV cache (`cache`), the rules of blocks (`blocks`), the token draw
(`draw`), both samplers (`denoise`, `block_sampler`) and the transformers wrapper (`modeling_ar2mdm`).

The package imports nothing else of ar2mdm, and its modules import each other relatively: `kdtrain export` ships
them as they are, and the exported folder loads where ar2mdm is not installed (tests/student/test_imports.py holds
the rule). The trainer, eval and export import it; the precompute draws its tokens with `draw.inverse_cdf`.
"""
