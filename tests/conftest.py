import jax

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_dtype_promotion", "strict")

# scripts that the sharding tests run in subprocesses with several host devices
collect_ignore = ["sharding_scripts"]
