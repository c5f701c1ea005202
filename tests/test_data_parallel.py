"""A train step sharded over 4 (fake CPU) devices equals the same step on 1 device.

Runs in a subprocess because the device count is fixed when JAX starts.
"""
import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(r"""
    import jax, jax.numpy as jnp, numpy as np, ml_collections
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from ldct_jax import models
    from ldct_jax.data.pipeline import to_global_batch
    from ldct_jax.methods import supervised
    from ldct_jax.train.optim import make_optimizer

    assert jax.device_count() == 4, jax.devices()
    optim = ml_collections.ConfigDict(dict(name="adam", lr=1e-2, schedule="constant"))
    rng = np.random.default_rng(0)
    batches = [{"ld": rng.normal(size=(8, 16, 16, 1)).astype(np.float32),
                "nd": rng.normal(size=(8, 16, 16, 1)).astype(np.float32)} for _ in range(3)]

    def train(model_cfg, devices):
      mesh = Mesh(np.array(devices), ("data",))
      model = models.get_model(ml_collections.ConfigDict(model_cfg))
      tx = make_optimizer(optim, 10)
      repl = NamedSharding(mesh, P())
      state = jax.jit(lambda r: supervised.create_train_state(model, tx, r, (1, 16, 16, 1)),
                      out_shardings=repl)(jax.random.PRNGKey(0))
      step = jax.jit(supervised.make_train_step(model, lambda a, b: jnp.mean((a - b) ** 2)),
                     donate_argnums=(0,), out_shardings=(repl, repl))
      losses = []
      for i, b in enumerate(batches):
        gb = to_global_batch(b, mesh)
        assert len(gb["ld"].sharding.device_set) == len(devices)
        state, m = step(state, gb, jax.random.PRNGKey(i))
        losses.append(float(m["loss"]))
      return losses, jax.device_get((state.params, state.batch_stats))

    for cfg in (dict(name="redcnn", features=8, kernel_size=3, num_layers=3),
                dict(name="dncnn", depth=4, features=8, use_bn=True, identity_init=False)):
      l1, p1 = train(cfg, jax.devices()[:1])
      l4, p4 = train(cfg, jax.devices())
      np.testing.assert_allclose(l1, l4, rtol=1e-5, atol=1e-6)
      for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p4)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
      print("OK", cfg["name"], l1)
""")


def test_four_device_step_matches_one_device():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
             JAX_PLATFORMS="cpu")
  result = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True,
                          text=True, timeout=600)
  assert result.returncode == 0, result.stdout + result.stderr
  assert result.stdout.count("OK") == 2
