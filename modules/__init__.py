"""``nn.Module``s only: DHEN and its layer modules, towers, the upstream DERM model, the downstream
CTR/CVR models and losses. No I/O, no process groups, no environment variables; every module builds
on any device, including ``meta``, so that ``sharding/`` can shard it (see ../shared/DESIGN.md).
The model of the paper's §3.1 and Appendix A arrives with the model issue."""
