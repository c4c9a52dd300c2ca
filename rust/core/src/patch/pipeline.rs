//! The pipeline of a patch: runs a [`PatchPlan`] in one streaming pass. The compute side goes through the
//! model in tensor order (patched tensors chunk by chunk of rows, in a rayon pool); a writer thread copies the
//! untouched tensors from the model file and writes the computed chunks, and commits the output when complete.

use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, SyncSender};
use std::time::Instant;

use super::compute::{self, Term, ROW_GROUP};
use super::kernel::Sums;
use super::plan::{next_writable_type, PatchNote, PatchPlan, PatchedTensor, TensorPlan};
use crate::error::{Error, Incompatible, Result};
use crate::gguf::split::{self, ShardedWriter, SplitRule};
use crate::gguf::{TensorSpec, WriteOptions};
use crate::model::ModelFile;
use crate::quant;
use crate::types::GgmlType;

/// f32 values per chunk of rows (about 4 MiB of f32 work per chunk).
const CHUNK_ELEMENTS: usize = 1 << 20;
/// Chunks in flight between the compute and the writer thread.
const PIPELINE_DEPTH: usize = 3;

/// Progress of a running patch, reported after each tensor and each chunk of a patched tensor.
#[derive(Clone, Debug)]
pub struct Progress<'a> {
    /// Tensors completed.
    pub tensors_done: usize,
    /// Tensors in the model.
    pub tensors_total: usize,
    /// The tensor being processed.
    pub tensor: &'a str,
    /// Output bytes produced so far.
    pub bytes_done: u64,
    /// Output bytes in all.
    pub bytes_total: u64,
}

/// The quality of one patched tensor.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorReport {
    /// Tensor name.
    pub name: String,
    /// Its type in the model.
    pub model_type: GgmlType,
    /// Its type in the output.
    pub out_type: GgmlType,
    /// Whether its values came from the base file (`--lora-base`) rather than the model.
    pub from_base: bool,
    /// Number of adapters that patched it.
    pub n_adapters: usize,
    /// The raw sums (see [`Sums`]).
    pub sums: Sums,
    /// Whether its quantizer used importance weights.
    pub used_imatrix: bool,
    /// When the keep-LoRA rule moved it to a larger type: the type it would have had, and what that type would
    /// have retained.
    pub promoted_from: Option<(GgmlType, f64)>,
    /// Elements per row (with the rows, what a type change costs in bytes).
    pub row_len: u64,
    /// Number of rows.
    pub rows: u64,
}

impl TensorReport {
    /// ‖ΔW‖ / ‖W_src‖: how big the intended change is.
    pub fn relative_change(&self) -> f64 {
        ratio(self.sums.delta_sq.sqrt(), self.sums.src_sq.sqrt())
    }

    /// ⟨Q − W_model, ΔW⟩ / ‖ΔW‖²: the share of the intended change present in the output compared with the
    /// model the user had (1 = all of it, 0 = lost in quantization noise).
    pub fn retained(&self) -> f64 {
        ratio(self.sums.vs_model_dot_delta, self.sums.delta_sq)
    }

    /// cos(Q − W_src, ΔW): whether what changed points the way the adapter wanted.
    pub fn cosine(&self) -> f64 {
        ratio(self.sums.applied_dot_delta, (self.sums.applied_sq * self.sums.delta_sq).sqrt())
    }

    /// ‖Q − W'‖ / ‖ΔW‖: the requantization error measured against the size of the change.
    pub fn error_ratio(&self) -> f64 {
        ratio(self.sums.error_sq.sqrt(), self.sums.delta_sq.sqrt())
    }

    /// Bytes the output spends on this tensor beyond what its planned type would have taken (0 unless promoted).
    pub fn extra_bytes(&self) -> u64 {
        match self.promoted_from {
            Some((from, _)) => tensor_bytes(self.out_type, self.row_len, self.rows).saturating_sub(tensor_bytes(
                from,
                self.row_len,
                self.rows,
            )),
            None => 0,
        }
    }
}

fn tensor_bytes(ty: GgmlType, row_len: u64, rows: u64) -> u64 {
    ty.row_bytes(row_len).unwrap_or(0).saturating_mul(rows)
}

fn ratio(a: f64, b: f64) -> f64 {
    if b == 0.0 {
        if a == 0.0 {
            0.0
        } else {
            f64::INFINITY
        }
    } else {
        a / b
    }
}

/// What a finished patch reports.
#[derive(Clone, Debug)]
pub struct PatchReport {
    /// The output file (a split output's first shard, the one llama.cpp opens).
    pub out: PathBuf,
    /// Every file written, in shard order (just `out` for an unsplit output).
    pub outputs: Vec<PathBuf>,
    /// One entry per patched tensor, in file order.
    pub tensors: Vec<TensorReport>,
    /// Tensors copied untouched.
    pub copied: usize,
    /// Bytes of the output file.
    pub bytes_written: u64,
    /// Wall time of the run, in seconds.
    pub seconds: f64,
    /// Things the user should know about the result (see [`PatchPlan::notes`]).
    pub notes: Vec<PatchNote>,
}

impl PatchPlan<'_> {
    /// Runs the patch, writing `out` atomically. `progress` is called after each tensor and chunk; an error
    /// from it cancels the run (nothing is written). When the output has several shards ([`PatchOptions::split`](super::PatchOptions::split))
    /// `out` names them as [`split::output_paths`] says (the first shard's name or a prefix), and the set appears
    /// only when every shard is complete.
    pub fn run(&self, out: &Path, progress: &mut dyn FnMut(&Progress<'_>) -> Result<()>) -> Result<PatchReport> {
        let known_count = match self.options.split {
            SplitRule::Keep => Some(self.model.shards().len() as u16),
            SplitRule::Merge => Some(1),
            _ => None,
        };
        // Names known before any work are checked now, so a bad one is refused before patching.
        for path in known_count.map(|n| split::output_paths(out, n)).transpose()?.unwrap_or_default() {
            self.check_output_path(&path)?;
        }
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(self.options.threads.unwrap_or(0))
            .build()
            .map_err(|e| Error::Incompatible(Incompatible::Other(format!("cannot start worker threads: {e}"))))?;
        self.run_in_pool(&pool, out, progress)
    }

    fn run_in_pool(
        &self,
        pool: &rayon::ThreadPool,
        out: &Path,
        progress: &mut dyn FnMut(&Progress<'_>) -> Result<()>,
    ) -> Result<PatchReport> {
        let start = Instant::now();
        let promotions = match self.options.keep_lora {
            Some(keep) => self.promotions(pool, keep)?,
            None => vec![None; self.tensors.len()],
        };
        let out_types: Vec<GgmlType> =
            self.tensors.iter().zip(&promotions).map(|(t, p)| p.as_ref().map_or(t.out_type, |p| p.to)).collect();
        let specs: Vec<TensorSpec> = self
            .tensors
            .iter()
            .zip(&out_types)
            .map(|(t, &ty)| {
                let info = &self.model.tensors()[t.model_index];
                TensorSpec { name: info.name.clone(), dims: info.dims.clone(), ty }
            })
            .collect();
        let out_sizes: Vec<u64> = specs
            .iter()
            .map(|s| crate::gguf::tensor_nbytes(&s.name, &s.dims, s.ty).map_err(Error::InvalidTensorInfo))
            .collect::<Result<_>>()?;
        let assignment = split::assign_shards(&out_sizes, self.options.split, &self.model.assignment())?;
        let paths = split::output_paths(out, assignment.last().map_or(1, |&s| s + 1))?;
        for path in &paths {
            self.check_output_path(path)?;
        }
        let options = WriteOptions { sync: self.options.sync };
        let writer = ShardedWriter::create(&paths, self.metadata(), specs, &assignment, options)?;
        let sizes: Vec<u64> = writer.tensors().map(|(_, n)| n).collect();
        let bytes_total: u64 = sizes.iter().sum();

        let (to_writer, from_compute) = mpsc::sync_channel::<Message>(PIPELINE_DEPTH);
        let (recycle_tx, recycle_rx) = mpsc::channel::<Vec<u8>>();
        let model = self.model;
        std::thread::scope(|scope| {
            let writer_thread = scope.spawn(move || write_loop(writer, from_compute, recycle_tx, model));
            let computed = self.compute_loop(pool, &to_writer, &recycle_rx, &sizes, bytes_total, &promotions, progress);
            let finish = match &computed {
                Ok(_) => to_writer.send(Message::Finish).is_ok(),
                Err(_) => false,
            };
            drop(to_writer);
            let written =
                writer_thread.join().unwrap_or_else(|_| Err(Error::WriterState("writer thread panicked".into())));
            match (computed, written) {
                // The writer's own error explains a failed send best (e.g. disk full).
                (_, Err(e)) if finish || matches!(e, Error::Io { .. }) => Err(e),
                (Err(e), _) => Err(e),
                (Ok(reports), Ok(Some(outputs))) => Ok(PatchReport {
                    out: outputs.first().cloned().unwrap_or_else(|| out.to_path_buf()),
                    copied: self.tensors.len() - reports.len(),
                    tensors: reports,
                    bytes_written: outputs.iter().map(|p| std::fs::metadata(p).map_or(0, |m| m.len())).sum(),
                    outputs,
                    seconds: start.elapsed().as_secs_f64(),
                    notes: self.notes.clone(),
                }),
                (Ok(_), _) => Err(Error::WriterState("writer stopped before the output was complete".into())),
            }
        })
    }

    #[allow(clippy::too_many_arguments)] // the pipeline's ends and the run's fixed facts, each used once
    fn compute_loop(
        &self,
        pool: &rayon::ThreadPool,
        to_writer: &SyncSender<Message>,
        recycled: &Receiver<Vec<u8>>,
        sizes: &[u64],
        bytes_total: u64,
        promotions: &[Option<Promotion>],
        progress: &mut dyn FnMut(&Progress<'_>) -> Result<()>,
    ) -> Result<Vec<TensorReport>> {
        let send = |m: Message| send_to_writer(to_writer, m);
        let mut reports = Vec::new();
        let mut bytes_done = 0u64;
        let n = self.tensors.len();
        for (i, plan) in self.tensors.iter().enumerate() {
            let info = &self.model.tensors()[plan.model_index];
            match &plan.patch {
                None => {
                    send(Message::Copy { tensor: plan.model_index })?;
                    bytes_done += sizes[i];
                }
                Some(patch) => {
                    let out_type = promotions[i].as_ref().map_or(plan.out_type, |p| p.to);
                    let mut emit = |out: Vec<u8>| {
                        bytes_done += out.len() as u64;
                        send(Message::Data(out))?;
                        progress(&Progress {
                            tensors_done: i,
                            tensors_total: n,
                            tensor: &info.name,
                            bytes_done,
                            bytes_total,
                        })
                    };
                    let mut buffer = || recycled.try_recv().unwrap_or_default();
                    let sums = self
                        .patch_tensor(pool, plan, patch, out_type, true, &mut buffer, &mut emit)
                        .map_err(|e| Error::InTensor { name: info.name.clone(), source: Box::new(e) })?;
                    reports.push(TensorReport {
                        name: info.name.clone(),
                        model_type: info.ty,
                        out_type,
                        from_base: patch.base_index.is_some(),
                        n_adapters: patch.terms.len(),
                        sums,
                        used_imatrix: self.imatrix_for(&info.name, out_type).is_some(),
                        promoted_from: promotions[i].as_ref().map(|p| (p.from, p.retained_before)),
                        row_len: info.row_len(),
                        rows: info.n_rows(),
                    });
                }
            }
            progress(&Progress { tensors_done: i + 1, tensors_total: n, tensor: &info.name, bytes_done, bytes_total })?;
        }
        Ok(reports)
    }

    /// The importance weights the quantizer of tensor `name` uses when written as `ty`.
    fn imatrix_for(&self, name: &str, ty: GgmlType) -> Option<&[f32]> {
        self.options.imatrix.as_deref().filter(|_| quant::takes_imatrix(ty)).and_then(|m| m.weights(name))
    }

    /// The keep-LoRA rule: for every patched tensor, compute it (without writing) in its planned type and then in
    /// larger types of its family until it retains at least `keep` of the LoRA change; `Some` where it moved.
    fn promotions(&self, pool: &rayon::ThreadPool, keep: f64) -> Result<Vec<Option<Promotion>>> {
        let mut result = vec![None; self.tensors.len()];
        for (i, plan) in self.tensors.iter().enumerate() {
            let Some(patch) = &plan.patch else { continue };
            let info = &self.model.tensors()[plan.model_index];
            let mut ty = plan.out_type;
            let mut first_retained = None;
            while let Some(next) = next_writable_type(ty, info.row_len()) {
                let mut scratch = Vec::new();
                let mut buffer = || std::mem::take(&mut scratch);
                let mut discard = |_: Vec<u8>| Ok(());
                let sums = self
                    .patch_tensor(pool, plan, patch, ty, false, &mut buffer, &mut discard)
                    .map_err(|e| Error::InTensor { name: info.name.clone(), source: Box::new(e) })?;
                let retained = ratio(sums.vs_model_dot_delta, sums.delta_sq);
                first_retained.get_or_insert(retained);
                if sums.delta_sq == 0.0 || retained >= keep {
                    break;
                }
                ty = next;
            }
            if ty != plan.out_type {
                result[i] =
                    Some(Promotion { from: plan.out_type, to: ty, retained_before: first_retained.unwrap_or(0.0) });
            }
        }
        Ok(result)
    }

    /// Computes one patched tensor written as `out_type`, chunk by chunk: each chunk's bytes go to `emit` in row
    /// order, in a buffer from `buffer` (recycled). With `release`, mapped source pages are dropped once used.
    #[allow(clippy::too_many_arguments)]
    fn patch_tensor(
        &self,
        pool: &rayon::ThreadPool,
        plan: &TensorPlan,
        patch: &PatchedTensor,
        out_type: GgmlType,
        release: bool,
        buffer: &mut dyn FnMut() -> Vec<u8>,
        emit: &mut dyn FnMut(Vec<u8>) -> Result<()>,
    ) -> Result<Sums> {
        let info = &self.model.tensors()[plan.model_index];
        let (src_file, src_index) = match (self.base, patch.base_index) {
            (Some(base), Some(bi)) => (base, bi),
            _ => (self.model, plan.model_index),
        };
        let src_info = &src_file.tensors()[src_index];
        let src = src_file.tensor_data(src_index);
        let model_data = self.model.tensor_data(plan.model_index);
        let cols = info.row_len() as usize;
        let rows = info.n_rows() as usize;
        let src_row_bytes = src_info.ty.row_bytes(cols as u64).unwrap_or(0) as usize;
        let model_row_bytes = info.ty.row_bytes(cols as u64).unwrap_or(0) as usize;
        let out_row_bytes = out_type.row_bytes(cols as u64).unwrap_or(0) as usize;
        let imatrix = self.imatrix_for(&info.name, out_type);
        // This tensor's factors, in f32 (read from mapped adapters now, dropped when the tensor is done).
        let mut factors = Vec::with_capacity(patch.terms.len());
        for &(a, p) in &patch.terms {
            let input = &self.adapters[a];
            let pair = &input.adapter.pairs[p];
            let (left, right) = pair.load()?;
            let magnitude = pair.magnitude.as_deref();
            factors.push((left, right, pair.rank, input.adapter.pair_scale(pair, input.scale), magnitude));
        }
        let terms: Vec<Term<'_>> = factors
            .iter()
            .map(|(left, right, rank, scale, magnitude)| Term {
                left,
                right,
                rank: *rank,
                scale: *scale,
                magnitude: *magnitude,
            })
            .collect();

        let compare_with_model = patch.base_index.is_some() && quant::can_dequantize(info.ty);
        let chunk_rows = (CHUNK_ELEMENTS / cols.max(1)).max(ROW_GROUP) / ROW_GROUP * ROW_GROUP;
        let mut sums = Sums::default();
        let mut row = 0;
        while row < rows {
            let n = chunk_rows.min(rows - row);
            let mut out = buffer();
            out.resize(n * out_row_bytes, 0);
            let src_range = row * src_row_bytes..(row + n) * src_row_bytes;
            let model_range = row * model_row_bytes..(row + n) * model_row_bytes;
            let job = compute::ChunkJob {
                src: &src[src_range.clone()],
                src_ty: src_info.ty,
                model: compare_with_model.then(|| (&model_data[model_range.clone()], info.ty)),
                first_row: row,
                cols,
                terms: &terms,
                out_ty: out_type,
                intermediate: self.options.intermediate,
                imatrix,
            };
            let chunk_sums = pool.install(|| compute::process_chunk(&job, &mut out))?;
            sums = sums.combine(chunk_sums);
            emit(out)?;
            if release {
                src_file.release_tensor_pages(src_index, src_range);
                if compare_with_model {
                    self.model.release_tensor_pages(plan.model_index, model_range);
                }
            }
            row += n;
        }
        Ok(sums)
    }
}

/// A tensor the keep-LoRA rule moved to a larger type.
#[derive(Clone, Debug)]
struct Promotion {
    from: GgmlType,
    to: GgmlType,
    retained_before: f64,
}

enum Message {
    Data(Vec<u8>),
    /// Copy model tensor `tensor` as it is, from its file.
    Copy {
        tensor: usize,
    },
    Finish,
}

/// Hands a message to the writer thread; it only refuses when the writer has stopped (its own error, e.g. a
/// full disk, is what the run then reports).
fn send_to_writer(to_writer: &SyncSender<Message>, message: Message) -> Result<()> {
    to_writer.send(message).map_err(|_| Error::WriterState("the writer stopped early".into()))
}

/// The writer thread: writes chunks in order, returns buffers for reuse, and commits on `Finish`. If the
/// compute side stops without `Finish`, the writer is dropped and its temporary file removed.
fn write_loop(
    mut writer: ShardedWriter,
    messages: Receiver<Message>,
    recycle: mpsc::Sender<Vec<u8>>,
    model: &ModelFile,
) -> Result<Option<Vec<PathBuf>>> {
    for message in messages {
        match message {
            Message::Data(buf) => {
                writer.write_data(&buf)?;
                let _ = recycle.send(buf);
            }
            Message::Copy { tensor } => {
                let (file, range) = model.tensor_source(tensor);
                writer.copy_from_file(file, range.start, range.end - range.start)?
            }
            Message::Finish => return writer.finish().map(Some),
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    //! A whole run on a tiny model built here, with values chosen so that ggml's rounding can be worked out by
    //! hand (q4_0: `d = max / -8`, code `min(15, (int)(x/d + 8.5))`; q5_0: `d = max / -16`, code
    //! `min(31, (int)(x/d + 16.5))`, as `quantize_row_q4_0_ref`/`q5_0_ref` do); the output is decoded by hand.
    use super::super::test_util::{adapter, model, pair, scratch, TestTensor};
    use super::*;
    use crate::patch::{PatchOptions, PatchPlan};

    /// One q4_0 row of 32: scale 1 (f16 0x3C00), element 0 = code 0 (-8, the largest magnitude), the rest code
    /// 10 (value 2).
    fn q4_0_row() -> Vec<u8> {
        let mut row = vec![0x00, 0x3C];
        row.extend((0..16).map(|j| if j == 0 { 0xA0 } else { 0xAA }));
        row
    }

    /// q5_0 by hand: f16 scale, 32 bits of fifth bits, 16 bytes of low nibbles (element j < 16 low, j + 16 high).
    fn decode_q5_0(block: &[u8]) -> Vec<f32> {
        let d = half::f16::from_le_bytes([block[0], block[1]]).to_f32();
        let qh = u32::from_le_bytes([block[2], block[3], block[4], block[5]]);
        (0..32)
            .map(|j| {
                let low = if j < 16 { block[6 + j] & 0x0F } else { block[6 + j - 16] >> 4 };
                let q = low as u32 | ((qh >> j) & 1) << 4;
                (q as f32 - 16.0) * d
            })
            .collect()
    }

    #[test]
    fn keep_lora_moves_a_tensor_that_loses_its_change_to_the_next_type_that_keeps_it() {
        let dir = scratch("pipeline-keep");
        let embd: Vec<f32> = (0..64).map(|i| i as f32 * 0.5 - 3.0).collect();
        let q = TestTensor {
            name: "blk.0.attn_q.weight",
            shape: vec![4, 32],
            ty: GgmlType::Q4_0,
            data: (0..4).flat_map(|_| q4_0_row()).collect(),
        };
        let m = model(&dir, "m.gguf", &[], &[TestTensor::f32("token_embd.weight", &[2, 32], &embd), q]);
        // ΔW = 0.25 on every element but the first of each row: W' = 2.25 there, -8 at column 0.
        let right: Vec<f32> = (0..32).map(|c| if c == 0 { 0.0 } else { 0.25 }).collect();
        let adapters = [adapter("a.gguf", None, vec![pair("blk.0.attn_q.weight", 4, 32, 1, vec![1.0; 4], right)], 1.0)];

        // In q4_0 (d = 1): 2.25 + 8.5 -> code 10 -> 2, nothing retained. In q5_0 (d = 0.5): 4.5 + 16.5 -> code
        // 21 -> 2.5, retained 0.5 · 0.25 / 0.25² = 2 >= 0.5: the rule stops there.
        let options = PatchOptions { keep_lora: Some(0.5), threads: Some(1), sync: false, ..PatchOptions::default() };
        let plan = PatchPlan::new(&m, None, &adapters, options).expect("plan");
        let report = plan.run(&dir.join("out.gguf"), &mut |_| Ok(())).expect("run");
        assert_eq!((report.copied, report.tensors.len()), (1, 1));
        let t = &report.tensors[0];
        assert_eq!(
            (t.model_type, t.out_type, t.promoted_from),
            (GgmlType::Q4_0, GgmlType::Q5_0, Some((GgmlType::Q4_0, 0.0)))
        );
        assert_eq!(t.retained(), 2.0);
        // q5_0 is 22 bytes a block, q4_0 18: 4 more per row.
        assert_eq!(t.extra_bytes(), 16);

        let out = ModelFile::open(&report.out).expect("output");
        assert_eq!(out.tensors()[1].ty, GgmlType::Q5_0);
        let expected: Vec<f32> = (0..32).map(|c| if c == 0 { -8.0 } else { 2.5 }).collect();
        for block in out.tensor_data(1).chunks_exact(22) {
            assert_eq!(decode_q5_0(block), expected);
        }
        // The untouched tensor is copied byte for byte.
        assert_eq!(out.tensor_data(0), m.tensor_data(0));

        // Without the rule the tensor stays q4_0, and the change is lost: the model's own bytes come back.
        let options = PatchOptions { threads: Some(1), sync: false, ..PatchOptions::default() };
        let plan = PatchPlan::new(&m, None, &adapters, options).expect("plan");
        let report = plan.run(&dir.join("plain.gguf"), &mut |_| Ok(())).expect("run");
        let t = &report.tensors[0];
        assert_eq!((t.out_type, t.promoted_from, t.retained()), (GgmlType::Q4_0, None, 0.0));
        assert_eq!(ModelFile::open(&report.out).expect("output").tensor_data(1), m.tensor_data(1));
    }

    #[test]
    fn an_error_from_the_progress_callback_cancels_the_run_and_writes_nothing() {
        let dir = scratch("pipeline-cancel");
        let m = model(&dir, "m.gguf", &[], &[TestTensor::f32("w", &[4, 32], &[1.0; 128])]);
        let adapters = [adapter("a.gguf", None, vec![pair("w", 4, 32, 1, vec![1.0; 4], vec![0.5; 32])], 1.0)];
        let options = PatchOptions { threads: Some(1), sync: false, ..PatchOptions::default() };
        let plan = PatchPlan::new(&m, None, &adapters, options).expect("plan");
        let out = dir.join("out.gguf");
        let result = plan.run(&out, &mut |_| Err(Error::Cancelled("stop".into())));
        // Reported in the tensor being computed.
        assert!(
            matches!(result.as_ref().map_err(Error::root), Err(Error::Cancelled(_))),
            "{:?}",
            result.map(|r| r.out)
        );
        let left: Vec<_> = std::fs::read_dir(&dir).expect("dir").map(|e| e.expect("entry").file_name()).collect();
        assert_eq!(left, ["m.gguf"], "no output and no temporary file");
    }
}
