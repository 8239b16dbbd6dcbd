"""The life of a run, one module per concern (train_retrieval.py keeps the command line, the set-up and the epochs).

- output:      the output folder, the file names in it, whether a run may use it, clean-up after a hard kill
- checkpoints: checkpoint_last.pth / checkpoint_best.pth payloads, the run state and exact resume
- stops:       SIGTERM/SIGUSR1/Ctrl-C finish the step on every rank, then save
- failures:    bad input (SetupError), the failure watch across ranks, one report per failure
- hooks:       test hooks (environment variables) that drive a real run into a stop or a failure
- training:    the training epoch, one optimizer step per batch
- results:     the fields of a result record besides recall (times, device, protocol, checkpoint identity)
- progress:    progress lines with ETA; tensorboard: TensorBoard scalars

Exit codes are in utils.py and atomic writes in atomic.py: models/ and search.py use them too.
"""
