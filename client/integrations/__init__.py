"""Callbacks that feed a framework's evaluation metrics to a ``RemoteScheduler``.

``client.integrations.huggingface.LRServeCallback`` (a ``transformers.TrainerCallback``) and
``client.integrations.lightning.LRServeCallback`` (a ``lightning.pytorch.Callback``). Each
module imports its framework when it is imported itself, so ``import lrserve.client`` (and this
package) needs neither. See docs/frameworks.md.
"""
