"""The chaos benchmark's own judgement: which printed tracebacks are the driver falling over."""

from benchmarks.chaos import driver_traceback

# What Ray prints for a trial whose checkpoint write met the full disk: the zip writer's error, then, while it
# was handled, the trial's own frames (constructed the way Python prints such a chain; paths shortened).
TRIAL_CHAINED = '''(train_trial pid=123) Traceback (most recent call last):
  File "/venv/lib/python3.11/site-packages/keras/src/saving/saving_lib.py", line 110, in save_model
    _save_state(...)
  File "/usr/lib/python3.11/zipfile.py", line 1200, in write
    self._fileobj.write(data)
OSError: [Errno 28] No space left on device

During handling of the above exception, another exception occurred:

Traceback (most recent call last):
  File "/venv/lib/python3.11/site-packages/ray/tune/trainable/function_trainable.py", line 45, in _trainable_func
    output = fn()
  File "/repo/trainables/train.py", line 420, in on_epoch_end
    save_classifier(folder, self.model)
OSError: [Errno 28] No space left on device
'''

DRIVER = '''Traceback (most recent call last):
  File "/repo/search/run.py", line 600, in main
    run_tuner(study, args, folder, prepared)
  File "/repo/search/storage.py", line 214, in write_atomic
    raise disk_full_error(exc, path)
search.storage.DiskFullError: [Errno 28] the disk holding '/mnt/x' is full
'''

DRIVER_CHAINED = '''Traceback (most recent call last):
  File "/venv/lib/python3.11/site-packages/pyarrow/parquet/core.py", line 1100, in write_table
    writer.write_table(table)
OSError: [Errno 28] No space left on device

The above exception was the direct cause of the following exception:

Traceback (most recent call last):
  File "/repo/search/results.py", line 300, in on_trial_result
    self.write()
OSError: [Errno 28] No space left on device
'''


def test_a_trials_chained_traceback_is_not_the_driver_falling_over():
    assert not driver_traceback("trial_003 errored; retrying\n" + TRIAL_CHAINED + "\nthe study stopped: ... is full")


def test_the_drivers_own_traceback_is_found_alone_chained_and_after_a_trials():
    assert driver_traceback(DRIVER)
    assert driver_traceback(DRIVER_CHAINED)
    assert driver_traceback(TRIAL_CHAINED + "\n" + DRIVER)


def test_output_without_a_traceback_is_clean():
    assert not driver_traceback("the study stopped: the disk holding 'x' is (nearly) full\nresume with: ...")
