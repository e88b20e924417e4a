"""benchmarks/profile_ops.py: XLA ops are attributed to the model path of their HLO metadata."""

from benchmarks import profile_ops

ENCODER = 'jit(<lambda>)/DIMaskDINO/pixel_decoder/encoder_layers_4/self_attn/jit(ms_deform_attn_xla)/reduce_sum'
TOP_K = 'jit(step_fn)/transpose(jvp(DIMaskDINO))/while/body/closed_call/checkpoint/rematted_computation/top_k'
HLO = (
  '  %multiply_reduce_fusion.5 = f32[1,20197,8,32]{3,2,1,0} fusion(%a, %b), kind=kLoop, calls=%fused_computation.149, '
  f'metadata={{op_name="{ENCODER}" stack_frame_id=403}}\n'
  '  %custom-call.8 = (f32[7,9408]{1,0}, s32[7,9408]{1,0}) custom-call(%x), custom_call_target="TopK", '
  f'metadata={{op_name="{TOP_K}"}}\n'
  '  %copy.1 = f32[4]{0} copy(%y)\n'
)


def test_op_paths_reads_the_metadata_of_each_instruction():
  assert profile_ops.op_paths(HLO) == {'multiply_reduce_fusion.5': ENCODER, 'custom-call.8': TOP_K}


def test_stage_of_drops_transformations_and_cuts_to_depth():
  assert profile_ops.stage_of(ENCODER, 1) == 'pixel_decoder'
  assert profile_ops.stage_of(ENCODER, 2) == 'pixel_decoder/encoder_layers_4'
  assert profile_ops.stage_of(ENCODER, 3) == 'pixel_decoder/encoder_layers_4/self_attn'
  # a backward op keeps its forward op's path; the scan of the looped mask losses is a stage of its own
  assert profile_ops.stage_of(TOP_K, 2) == 'while/body'
  assert profile_ops.stage_of('jit(step_fn)', 2) == '(outside the model)'


def test_the_suite_s_slow_first_list_names_existing_files():
  """tests/conftest.py hands these files out first; a renamed one would silently lose its place."""
  import os

  from tests import conftest

  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  missing = [p for p in conftest._SLOW_FIRST if not os.path.isfile(os.path.join(root, p))]
  assert not missing, missing
