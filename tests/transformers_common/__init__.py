# Copyright 2019 HuggingFace Inc.
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
"""transformers' common model and config tests, vendored from the transformers repository (v5 development line:
`tests/test_modeling_common.py`, `tests/test_configuration_common.py`), trimmed to what applies to a CPU-testable,
attention-free, non-generative model and adapted to the installed transformers (5.24). The transformers test files
are not part of the pip package, hence the copy. Each module lists what it changed and what it left out.

`tests/test_transformers_common.py` applies them to the RWKV-CLIP classes the way transformers'
`tests/models/clip/test_modeling_clip.py` applies them to CLIP.
"""
