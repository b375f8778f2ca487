"""ReasonRank data synthesis: teachers, the pipeline (positives, listwise labels, self-consistency
filter), upstream's released formats, and the embedded synthetic reasoning-intensive task.

`python -m rrjax.synth --help` for the CLI.
"""

from rrjax.synth.client import ChatClient, ChatResponse, ClientConfig, ClientStats
from rrjax.synth.formats import write_labelled_set, write_sft_json, write_training_jsonl
from rrjax.synth.inputs import file_inputs, synthesize_task, task_inputs
from rrjax.synth.pipeline import (ALPHA, QueryInput, Sample, SynthConfig, SynthReport, ndcg_at_10, passes_filter,
                                  synthesize)
from rrjax.synth.task import SyntheticQuery, SyntheticTask, TaskConfig, generate
from rrjax.synth.teachers import (ChatTeacher, JudgeRequest, LocalTeacher, ProgrammaticTeacher, RankRequest,
                                  RankResult, Teacher, pointwise_messages, rankgpt_messages)
