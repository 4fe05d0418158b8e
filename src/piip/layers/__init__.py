from .branch import ViTBranch, window_attention
from .heads import BranchMerge, MergedClassifier, SimpleFeaturePyramid
from .interaction import ConvFFN, CrossAttention, Injector, Interaction, InteractionUnit
