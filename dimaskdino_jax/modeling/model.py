"""DIMaskDINO: backbone -> pixel decoder -> predictor (the paper's Figure 2).

`Predictor.__call__` runs the paper's stages in order, one method each: image tokens T_i, first selection
(T_s1), token interaction and second selection (T_s2), the balance-aware query Q_bal, the denoising queries,
the decoder with guiding-token generation and BATO, and the prediction heads. docs/architecture.md draws the
data flow with the shapes; `formulation='official'` reproduces the official code, quirks included
(docs/official_vs_paper.md), `'paper'` follows Eq. 1-11. With DI and BATO off and one top-k selection it is
MaskDINO. The names kept from the official code (`tgt`, `refpoint`, `oldm`, ...) are in docs/glossary.md.

Shapes: B images, (H, W) canvas, d hidden, C classes, S_e encoder tokens, K = k1, Q = k2 (decoder queries),
N_dn = DN slots, L decoder layers, T token-interaction layers, (Hm, Wm) = (H/4, W/4) mask-feature map.
"""

import math
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from ml_collections import FrozenConfigDict

from dimaskdino_jax.box_ops import inverse_sigmoid
from dimaskdino_jax.modeling import selection
from dimaskdino_jax.modeling.backbone import ResNet
from dimaskdino_jax.modeling.bato import BATO
from dimaskdino_jax.modeling.de_imbalance import DeImbalanceStage, ResidualCrossAttention
from dimaskdino_jax.modeling.decoder import DecoderLayer
from dimaskdino_jax.modeling.denoising import dn_attention_mask, dn_layout, dn_queries, draw_dn_noise
from dimaskdino_jax.modeling.encoder import PixelDecoder, flatten_levels, resize_bilinear
from dimaskdino_jax.modeling.layers import (
  MLP,
  Conv,
  Dense,
  c2_xavier_fill,
  conv_padding,
  torch_linear_bias_init,
  xavier_uniform,
)
from dimaskdino_jax.modeling.outputs import DenoisingInfo, HeadOutputs, MaskFactors, Predictions, mask_logits
from dimaskdino_jax.modeling.position import box_sine_embedding, sine_embedding_2d

Array = Any


class FirstSelection(NamedTuple):
  """What the first (two-stage) selection hands on (docs/architecture.md, "First selection")."""

  tokens: Array  # (B, S_e, d) enc_output_norm(enc_output(T_i)): the tokens class_embed scores (`output_memory`)
  boxes: Array  # (B, S_e, 4) unsigmoided box of every token (proposal + _bbox_embed delta)
  content: Array  # (B, K, d) T_s1, the selected tokens, detached (`tgt`)
  anchors: Array  # (B, K, 4) unsigmoided anchors of T_s1 (`refpoint`): mask2box or the selected boxes
  interm: HeadOutputs  # the encoder ("interm") predictions of the K selected tokens
  interm_embeds: Array  # (B, K, d) their mask embeddings (the factor of interm.masks besides F)


class DenoisingQueries(NamedTuple):
  """The decoder's queries with the DN slots in front of the matching queries (docs/architecture.md)."""

  content: Array  # (B, N_dn + Q, d)
  anchors: Array  # (B, N_dn + Q, 4) unsigmoided
  attention_mask: Array | None  # (N_dn + Q, N_dn + Q) bool, True = blocked; None without DN
  info: DenoisingInfo | None  # the DN layout for the criterion; None without DN
  num_slots: int  # N_dn (0 without DN)


class DecoderOutputs(NamedTuple):
  """Per-layer decoder results, lists over the L layers."""

  normed: list  # L x (B, N_dn + Q, d): decoder_norm(output of layer l) (`hs`)
  references: list  # (L + 1) x (B, N_dn + Q, 4) sigmoid: the input boxes of each layer, then the last refined
  mask_features: list  # L x (B, Hm, Wm, d): the mask features each layer's masks use (F, or F' after BATO)


class Predictor(nn.Module):
  """DIMaskDINODecoder. Shared heads (class_embed, mask_embed, bbox_embed, decoder_norm) are single modules
  called from every place that uses them, as in the official code."""

  cfg: FrozenConfigDict  # the `model` section of a config

  def setup(self):
    model = self.cfg
    dim, num_classes = model.hidden_dim, model.num_classes
    decoder = model.decoder
    self.enc_output = Dense(dim, kernel_init=xavier_uniform, bias_init=torch_linear_bias_init(dim))
    self.enc_output_norm = nn.LayerNorm(epsilon=1e-5)
    if model.class_prior_prob > 0:  # focal-loss prior (not in the official code, which keeps torch's Linear init)
      prior = model.class_prior_prob
      bias_init = nn.initializers.constant(-math.log((1 - prior) / prior))
    else:
      bias_init = torch_linear_bias_init(dim)
    self.class_embed = Dense(
      num_classes, kernel_init=nn.initializers.variance_scaling(1 / 3, 'fan_in', 'uniform'), bias_init=bias_init
    )
    self.mask_embed = MLP(hidden_dim=dim, output_dim=dim, num_layers=3)
    # `_bbox_embed`, shared by the first selection and every decoder layer.
    self.bbox_embed = MLP(hidden_dim=dim, output_dim=4, num_layers=3, zero_last=True)
    self.decoder_norm = nn.LayerNorm(epsilon=1e-5)
    if model.dn.mode != 'none' and model.dn.num > 0:
      self.label_enc = nn.Embed(num_classes, dim, embedding_init=nn.initializers.normal(1.0))
    self.ref_point_head = MLP(hidden_dim=dim, output_dim=dim, num_layers=2)  # decoder.ref_point_head: 2d -> d -> d
    layer_cls = nn.remat(DecoderLayer, static_argnums=(6,)) if model.remat else DecoderLayer
    self.decoder_layers = [
      layer_cls(
        dim=dim,
        num_levels=model.encoder.total_num_feature_levels,
        num_heads=decoder.num_heads,
        num_points=decoder.num_points,
        ffn_dim=decoder.ffn_dim,
        impl=model.msda_impl,
      )
      for _ in range(decoder.num_layers)
    ]
    selection_ks = tuple(model.di.selection_ks)
    if model.di.enabled:
      self.oldm = [
        DeImbalanceStage(
          dim=dim,
          num_layers=model.di.ti_layers,
          num_heads=decoder.num_heads,
          ffn_dim=decoder.ffn_dim,
          name='oldm' if i == 0 else f'oldm_{i}',
        )
        for i in range(len(selection_ks) - 1)
      ]
      if model.formulation == 'paper':
        self.di_residual = ResidualCrossAttention(dim=dim, num_heads=decoder.num_heads, ffn_dim=decoder.ffn_dim)
    if model.di.random_position_tokens:  # Table 3: learned, image-independent position tokens for the decoder queries
      self.random_refpoints = self.param('random_refpoints', nn.initializers.normal(1.0), (selection_ks[-1], 4))
    if model.bato.enabled:
      self.query_guide_feature_update = BATO(
        dim=dim,
        num_heads=decoder.num_heads,
        ffn_dim=decoder.ffn_dim,
        formulation=model.formulation,
        guiding_token_generation=model.bato.guiding_token_generation,
      )
      self.mask_output_conv = Conv(dim, (3, 3), padding=conv_padding(3), use_bias=False, kernel_init=c2_xavier_fill())
      self.mask_output_conv_norm = nn.GroupNorm(num_groups=model.encoder.num_groups, epsilon=1e-5)

  # ------------------------------------------------------------------------------------------- forward
  def __call__(self, multi_scale, mask_features, targets=None, train=False, all_layer_masks=False):
    """The paper's Figure 2. multi_scale: the encoder's maps [(B, H/8, W/8, d), ..., (B, H/64, W/64, d)];
    mask_features F (B, Hm, Wm, d); targets (dict 'boxes', 'labels', 'valid', optionally 'dn_noise': a DnNoise and
    'dn_max_gt': () int) feed the DN queries when `train`.
    """
    selection_ks = tuple(self.cfg.di.selection_ks)
    extras = {}  # intermediate tensors for analysis and the parity tests
    memory, shapes, memory_pos = self.image_tokens(multi_scale)  # T_i (B, S_e, d)
    first = self.first_selection(memory, shapes, mask_features, train, extras)  # T_s1 (B, K, d)
    guides = self.guide_candidates(first)  # token sets BATO may be guided by
    content, anchors, di_aux = first.content, first.anchors, []
    for index, (stage, k) in enumerate(zip(self.oldm if self.cfg.di.enabled else (), selection_ks[1:])):
      interacted, refined, aux = self.token_interaction(stage, content, anchors)  # (B, K, d), (B, K, 4)
      content, anchors = self.second_selection(stage, interacted, refined, k, f'di_topk_index_{index}', extras)
      di_aux.append(aux)
    if self.cfg.di.enabled:
      guides['T_s2'] = (content, jax.nn.sigmoid(anchors))  # T_s2 (B, Q, d)
    content, anchors = self.balance_aware_query(content, anchors, memory, memory_pos)  # Q_bal (B, Q, d)
    guides['Q_bal'] = (content, jax.nn.sigmoid(anchors))
    extras['q_bal'] = content
    queries = self.denoising_queries(content, anchors, targets, train)  # [DN ++ Q_bal] (B, N_dn + Q, d)
    decoded = self.decoder(queries, memory, memory_pos, shapes, mask_features, guides, extras)
    layers, dn, factors = self.prediction_heads(queries, decoded, mask_features, with_masks=train or all_layer_masks)
    return Predictions(
      layers=layers,
      interm=first.interm,
      di_aux=di_aux[0] if di_aux else None,
      di_aux_more=tuple(di_aux[1:]),
      dn=dn,
      dn_info=queries.info,
      extras=extras,
      mask_factors=factors.replace(interm_embeds=first.interm_embeds) if train else None,
    )

  # ------------------------------------------------------------------------------------------- shared heads
  def heads(self, x, mask_features, with_masks=True, split=None):
    """forward_prediction_heads: x (B, N, d), mask_features (B, Hm, Wm, d) -> logits (B, N, C) of decoder_norm(x),
    masks (B, N, Hm, Wm) = embeds . mask_features or None without masks, embeds (B, N, d) = mask_embed(
    decoder_norm(x)) (None without masks).

    split S: masks is the pair (masks of x[:, :S], of x[:, S:]) as two products, so that a part nobody reads is
    never computed (XLA drops it): the DN slots' masks in training, whose losses use the MaskFactors.
    """
    normed = self.decoder_norm(x)
    logits = self.class_embed(normed)
    if not with_masks:
      return logits, None, None
    embeds = self.mask_embed(normed)
    if split is None:
      return logits, mask_logits(embeds, mask_features), embeds
    return (
      logits,
      (mask_logits(embeds[:, :split], mask_features), mask_logits(embeds[:, split:], mask_features)),
      embeds,
    )

  def query_pos(self, ref):
    """ref_point_head(gen_sineembed_for_position(ref)): ref (B, N, 4) sigmoid boxes -> (B, N, d)."""
    return self.ref_point_head(box_sine_embedding(ref, self.cfg.hidden_dim // 2))

  # ------------------------------------------------------------------------------------------- stages
  def image_tokens(self, multi_scale):
    """T_i: the encoder's maps flattened in the decoder's level order, coarsest first [1/64, 1/32, 1/16, 1/8]
    (the reverse of the encoder's; docs/official_vs_paper.md, "Quirks this code reproduces").

    multi_scale [(B, H_l, W_l, d)] in encoder order -> memory (B, S_e, d), shapes ((H_l, W_l), ...) in decoder
    order, memory_pos (S_e, d) sine position of every token (no level embedding; used by BATO and Eq. 4).
    """
    dim = self.cfg.hidden_dim
    memory, shapes = flatten_levels(multi_scale[::-1])  # (B, S_e, d)
    memory_pos = jnp.concatenate([sine_embedding_2d(h, w, dim // 2).reshape(h * w, dim) for h, w in shapes], 0)
    return memory, shapes, memory_pos

  def first_selection(self, memory, shapes, mask_features, train, extras):
    """First selection, T_i -> T_s1 (paper Eq. 1; MaskDINO's two-stage selection with mask-enhanced anchors).

    memory (B, S_e, d) in decoder level order, mask_features (B, Hm, Wm, d) -> FirstSelection: every token scored
    by class_embed (no decoder_norm) after enc_output + enc_output_norm, the top k1 kept; their interm predictions
    (masks returned only when `train`) and anchors from the interm masks (box_init 'mask2box' / 'bitmask') or the
    selected boxes ('none'). Records extras['enc_topk_index'] (B, K).
    """
    proposals, valid = selection.encoder_proposals(shapes)  # (S_e, 4) logits, (S_e,)
    tokens = self.enc_output_norm(self.enc_output(jnp.where(valid[None, :, None], memory, 0.0)))  # (B, S_e, d)
    token_logits = self.class_embed(tokens)  # (B, S_e, C), no decoder_norm
    token_boxes = self.bbox_embed(tokens) + proposals[None]  # (B, S_e, 4) unsigmoided
    index = selection.topk_indices(token_logits, self.cfg.di.selection_ks[0])  # (B, K)
    extras['enc_topk_index'] = index
    ref_undetach = selection.gather_tokens(token_boxes, index)  # (B, K, 4)
    tgt_undetach = selection.gather_tokens(tokens, index)  # (B, K, d)
    interm_logits, interm_masks, interm_embeds = self.heads(tgt_undetach, mask_features)
    interm = HeadOutputs(interm_logits, jax.nn.sigmoid(ref_undetach), interm_masks if train else None)
    content = jax.lax.stop_gradient(tgt_undetach)
    box_init = self.cfg.decoder.box_init
    if box_init == 'none':
      anchors = jax.lax.stop_gradient(ref_undetach)
    else:
      anchors = selection.mask2box_anchors(interm_masks, plus_one=box_init == 'bitmask')
    return FirstSelection(tokens, token_boxes, content, anchors, interm, interm_embeds)

  def guide_candidates(self, first):
    """The token sets BATO may take its guiding queries from (config bato.guidance), as far as they exist after
    the first selection: name -> (tokens (B, n, d), boxes (B, n, 4) sigmoid). 'T_s2' and 'Q_bal' are added by
    `__call__`; 'decoder0' (the official choice) is the output of decoder layer 0, taken in `decoder`."""
    guides = {}
    if self.cfg.bato.enabled and self.cfg.bato.guidance == 'T_i':
      guides['T_i'] = (first.tokens, jax.nn.sigmoid(first.boxes))
    guides['T_s1'] = (first.content, jax.nn.sigmoid(first.anchors))
    return guides

  def token_interaction(self, stage, content, anchors):
    """Token interaction of one DI stage (paper Eq. 2; official `oldm`): T layers of self-attention + FFN with
    iterative box refinement.

    content (B, K, d), anchors (B, K, 4) unsigmoided -> interacted (B, K, d) un-normed last output, refined
    (B, K, 4) its last refined boxes (sigmoid, not detached), aux HeadOutputs (T, B, K, ...) for the DI losses:
    logits through oldm_norm and decoder_norm (the official double LayerNorm), boxes with the double delta.
    """
    interacted, refined, normed, aux_boxes = stage(content, anchors)
    aux_logits = self.class_embed(self.decoder_norm(normed))  # (T, B, K, C): double LayerNorm quirk
    return interacted, refined, HeadOutputs(aux_logits, aux_boxes)

  def second_selection(self, stage, interacted, refined, k, index_name, extras):
    """Second selection, T_s1 -> T_s2 (paper Eq. 3): the top k of the interacted tokens by class_embed(oldm_norm(.)).

    interacted (B, K, d), refined (B, K, 4) sigmoid -> content (B, k, d) un-normed, anchors (B, k, 4) unsigmoided
    (the refined boxes, not detached). Records extras[index_name] (B, k).
    """
    index = selection.topk_indices(self.class_embed(stage.norm(interacted)), k)  # (B, k)
    extras[index_name] = index
    content = selection.gather_tokens(interacted, index)
    anchors = inverse_sigmoid(selection.gather_tokens(refined, index))
    return content, anchors

  def balance_aware_query(self, content, anchors, memory, memory_pos):
    """Q_bal, the decoder's matching queries (paper Eq. 4).

    content (B, Q, d) = T_s2 (T_s1 without DI), anchors (B, Q, 4) unsigmoided, memory T_i (B, S_e, d), memory_pos
    (S_e, d) -> Q_bal content (B, Q, d), anchors (B, Q, 4). Official: Q_bal = T_s2. Paper (with DI): Q_bal =
    MHCA(T_s2, T_i) with self-attention and FFN (`di_residual`). With random_position_tokens (Table 3) the anchors
    are replaced by learned, image-independent ones.
    """
    if self.cfg.di.enabled and self.cfg.formulation == 'paper':
      content = self.di_residual(content, self.oldm[-1].query_pos(jax.nn.sigmoid(anchors)), memory, memory_pos[None])
    if self.cfg.di.random_position_tokens:
      anchors = jnp.broadcast_to(self.random_refpoints[None], anchors.shape)
    return content, anchors

  def denoising_queries(self, content, anchors, targets, train):
    """The DN queries (docs/architecture.md, "Denoising queries"): noised GT labels and boxes in N_dn = dn.num
    static slots, put in front of the matching queries, and the self-attention mask that keeps them apart.

    content (B, Q, d), anchors (B, Q, 4) unsigmoided, targets {'labels' (B, G), 'boxes' (B, G, 4), 'valid'
    (B, G)} -> DenoisingQueries. Without DN (inference, no targets, DN off) the queries pass through unchanged.
    """
    model = self.cfg
    dn_on = model.dn.mode != 'none' and model.dn.num > 0
    if not (train and targets is not None and dn_on):
      if dn_on and self.is_initializing():
        self.label_enc(jnp.zeros((1,), jnp.int32))  # create the DN embedding even when init runs without DN
      return DenoisingQueries(content, anchors, None, None, 0)
    # 'dn_max_gt' / 'dn_noise': given by the trainer (drawn for the whole batch, so that a step run per data shard
    # is the one-device step) or by the parity tests (the official code's draws); else drawn here.
    info, group = dn_layout(targets['valid'], model.dn.num, targets.get('dn_max_gt'))
    noise = targets.get('dn_noise')
    if noise is None:
      noise = draw_dn_noise(self.make_rng('dn'), info.positive.shape, model.num_classes, model.dn.noise_scale)
    dn_content, dn_anchors = dn_queries(
      noise,
      targets['labels'],
      targets['boxes'],
      info,
      model.dn.noise_scale,
      self.label_enc,
    )
    return DenoisingQueries(
      content=jnp.concatenate([dn_content, content], 1),
      anchors=jnp.concatenate([dn_anchors, anchors], 1),
      attention_mask=dn_attention_mask(group, content.shape[1]),
      info=info,
      num_slots=model.dn.num,
    )

  def guiding_token_generation(self, output, query_pos, num_dn, guides, extras):
    """Guiding-token generation (paper Eq. 5-7): the guiding queries and the keys and values BATO attends to.

    output (B, N_dn + Q, d) un-normed output of the decoder layer before BATO, query_pos (B, N_dn + Q, d) its
    position queries -> key, value (B, n, d), n = bato.num_guiding_tokens. The guiding queries are the top n of
    the guidance set (bato.guidance: 'decoder0' = that output's matching part, the official choice) by class_embed
    without decoder_norm; BATO's `guiding_tokens` turns them into keys and values. Records
    extras['bato_topk_index'] (B, n).
    """
    model = self.cfg
    if model.bato.guidance == 'decoder0':
      guide, guide_pos = output[:, num_dn:], query_pos[:, num_dn:]  # un-normed previous output, matching part
    else:
      guide, guide_boxes = guides[model.bato.guidance]
      guide_pos = self.query_pos(guide_boxes)
    index = selection.topk_indices(self.class_embed(guide), model.bato.num_guiding_tokens)  # (B, n)
    extras['bato_topk_index'] = index
    guide, guide_pos = selection.gather_tokens(guide, index), selection.gather_tokens(guide_pos, index)
    return self.query_guide_feature_update.guiding_tokens(guide, guide_pos, self.mask_embed)

  def bato(self, memory, memory_pos, key, value, shapes, mask_features, extras):
    """BATO (paper Eq. 8): T_bal = MHCA(T_i, T_g) with FFN, and the mask features updated from its 1/8 level.

    memory T_i (B, S_e, d), memory_pos (S_e, d), key / value (B, n, d) from `guiding_token_generation`,
    mask_features F (B, Hm, Wm, d) -> T_bal (B, S_e, d) (the value of the later decoder layers), F' (B, Hm, Wm, d)
    = relu(GN(conv3x3(F + resize(T_bal's 1/8 level)))). Records extras['bato_memory'], ['updated_mask_features'].
    """
    dim = self.cfg.hidden_dim
    memory = self.query_guide_feature_update(memory, memory_pos[None], key, value)
    finest_hw = shapes[-1]  # the 1/8 level, last in decoder order
    finest = memory[:, -finest_hw[0] * finest_hw[1] :].reshape(memory.shape[0], *finest_hw, dim)
    fused = mask_features + resize_bilinear(finest, mask_features.shape[1:3])
    updated_mask_features = nn.relu(self.mask_output_conv_norm(self.mask_output_conv(fused)))
    extras['bato_memory'] = memory
    extras['updated_mask_features'] = updated_mask_features
    return memory, updated_mask_features

  def decoder(self, queries, memory, memory_pos, shapes, mask_features, guides, extras):
    """The deformable decoder with iterative box refinement; BATO before layer bato.layer (official: 1).

    queries (DenoisingQueries, N = N_dn + Q), memory T_i (B, S_e, d), mask_features F (B, Hm, Wm, d) ->
    DecoderOutputs. Layer l refines its input boxes with bbox_embed of its un-normed output; the next layer gets
    them detached, while `references` keeps them attached ("look forward twice", used by the heads).
    """
    model = self.cfg
    ref = jax.nn.sigmoid(queries.anchors)  # (B, N, 4), not detached
    references, normed, layer_mask_features = [ref], [], []
    output = queries.content
    current_mask_features = mask_features
    for layer_index, layer in enumerate(self.decoder_layers):
      query_pos = self.query_pos(ref)
      if model.bato.enabled and layer_index == model.bato.layer:
        key, value = self.guiding_token_generation(output, query_pos, queries.num_slots, guides, extras)
        memory, current_mask_features = self.bato(memory, memory_pos, key, value, shapes, mask_features, extras)
      output = layer(output, query_pos, ref, memory, queries.attention_mask, shapes)
      new_ref = jax.nn.sigmoid(self.bbox_embed(output) + inverse_sigmoid(ref))
      references.append(new_ref)
      ref = jax.lax.stop_gradient(new_ref)
      normed.append(self.decoder_norm(output))
      layer_mask_features.append(current_mask_features)
    return DecoderOutputs(normed, references, layer_mask_features)

  def prediction_heads(self, queries, decoded, mask_features, with_masks):
    """The heads on [initial queries, layer 0, ..., L-1], split into matching queries and DN slots.

    queries (DenoisingQueries), decoded (DecoderOutputs) -> (layers, dn, factors): HeadOutputs (N, B, Q, ...) and
    (N, B, N_dn, ...) or None, N = L + 1 (L without decoder.initial_pred); factors (MaskFactors, interm_embeds
    None) the masks' embeddings and feature maps when `with_masks`, else None. Masks for every entry when
    `with_masks`, else for the last only. Layer outputs are normed again by `heads` (official double LayerNorm).
    """
    model = self.cfg
    num_layers = model.decoder.num_layers
    num_dn = queries.num_slots
    # masks: (DN slots, matching queries) pairs, stacked apart (see `heads`).
    logits0, masks0, embeds0 = self.heads(queries.content, mask_features, with_masks=with_masks, split=num_dn)
    logits, boxes, masks, embeds = [logits0], [decoded.references[0]], [masks0], [embeds0]
    for layer_index in range(num_layers):
      last = layer_index == num_layers - 1
      layer_logits, layer_masks, layer_embeds = self.heads(
        decoded.normed[layer_index], decoded.mask_features[layer_index], with_masks=with_masks or last, split=num_dn
      )
      logits.append(layer_logits)
      boxes.append(
        jax.nn.sigmoid(self.bbox_embed(decoded.normed[layer_index]) + inverse_sigmoid(decoded.references[layer_index]))
      )
      masks.append(layer_masks)
      embeds.append(layer_embeds)
    logits, boxes = jnp.stack(logits), jnp.stack(boxes)  # (N, B, N_dn + Q, ...)
    if not with_masks:
      masks = masks[-1:]
    elif not model.decoder.initial_pred:
      masks = masks[1:]
    dn_masks, masks = (jnp.stack([m[part] for m in masks]) for part in (0, 1))  # (N, B, N_dn / Q, Hm, Wm)
    if not model.decoder.initial_pred:
      logits, boxes = logits[1:], boxes[1:]
      embeds = embeds[1:]
    factors = None
    if with_masks:
      # The distinct maps: F, and F' from BATO's layer on (as `decoder` switches them); map 0 of the initial entry.
      bato_layer = model.bato.layer if model.bato.enabled and model.bato.layer < num_layers else None
      distinct = [mask_features] if bato_layer is None else [mask_features, decoded.mask_features[bato_layer]]
      index = (0, *(int(bato_layer is not None and i >= bato_layer) for i in range(num_layers)))
      if not model.decoder.initial_pred:
        index = index[1:]
      factors = MaskFactors(jnp.stack(embeds), None, jnp.stack(distinct), index, num_dn)

    layers = HeadOutputs(logits[:, :, num_dn:], boxes[:, :, num_dn:], masks)
    dn = None
    if queries.info is not None:
      dn = HeadOutputs(logits[:, :, :num_dn], boxes[:, :, :num_dn], dn_masks)
    return layers, dn, factors


class DIMaskDINO(nn.Module):
  """images uint8/float (B, H, W, 3) RGB 0-255 -> Predictions.

  `image_hw` (B, 2), when given, zeroes the normalized pixels outside each image (the official ImageList pads
  with 0 after normalization). `targets` (dict with 'boxes', 'labels', 'valid') feed DN in training; `train`
  selects DN and all-layer masks; rng collection 'dn' is needed when DN runs.
  """

  cfg: FrozenConfigDict  # the `model` section of a config

  def setup(self):
    model = self.cfg
    backbone = model.backbone
    self.backbone = ResNet(
      depth=backbone.depth,
      stem_width=backbone.stem_width,
      width=backbone.width,
      res2_out_channels=backbone.res2_out_channels,
      freeze_at=backbone.freeze_at,
      dtype=jnp.bfloat16 if backbone.dtype == 'bfloat16' else jnp.float32,
      norm=backbone.norm,
      norm_groups=backbone.norm_groups,
    )
    encoder = model.encoder
    self.pixel_decoder = PixelDecoder(
      dim=model.hidden_dim,
      num_layers=encoder.num_layers,
      num_heads=encoder.num_heads,
      num_points=encoder.num_points,
      ffn_dim=encoder.ffn_dim,
      total_levels=encoder.total_num_feature_levels,
      num_groups=encoder.num_groups,
      impl=model.msda_impl,
      remat=model.remat,
    )
    self.predictor = Predictor(model)

  def normalize(self, images, image_hw=None):
    """(images - pixel_mean) / pixel_std (B, H, W, 3) float32, zero outside `image_hw` when given."""
    mean = jnp.asarray(self.cfg.pixel_mean, jnp.float32)
    std = jnp.asarray(self.cfg.pixel_std, jnp.float32)
    x = (images.astype(jnp.float32) - mean) / std
    if image_hw is not None:
      h, w = x.shape[1:3]
      inside = (jnp.arange(h)[None, :, None] < image_hw[:, 0, None, None]) & (
        jnp.arange(w)[None, None, :] < image_hw[:, 1, None, None]
      )
      x = jnp.where(inside[..., None], x, 0.0)
    return x

  def __call__(self, images, targets=None, train=False, image_hw=None, all_layer_masks=False):
    x = self.normalize(images, image_hw)
    features = self.backbone(x)
    mask_features, multi_scale = self.pixel_decoder(features)
    return self.predictor(multi_scale, mask_features, targets, train, all_layer_masks)


def build_model(config) -> DIMaskDINO:
  """The model for a full config (uses `config.model`)."""
  return DIMaskDINO(FrozenConfigDict(config.model))
