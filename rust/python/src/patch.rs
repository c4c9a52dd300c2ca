//! LoRA adapters and the patch engine for Python.

use std::path::PathBuf;
use std::sync::Arc;

use ggml_lora_core::adapter::{self, LoraAdapter};
use ggml_lora_core::gguf::{tensor_nbytes, TensorInfo};
use ggml_lora_core::imatrix::Imatrix;
use ggml_lora_core::model::ModelFile;
use ggml_lora_core::patch::{AdapterInput, PatchNote, PatchOptions, PatchPlan};
use ggml_lora_core::paths;
use ggml_lora_core::peft::{self, ModuleKind, PeftPlan, PeftTarget};
use ggml_lora_core::Error;
use numpy::{PyArray1, PyArrayDyn, PyArrayMethods, PyReadonlyArrayDyn};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList, PyString};

use crate::convert::NativePeftWeights;
use crate::errors::IntoPyResult;
use crate::gguf::{ggml_type, PySplitRule};
use crate::lora_pair::LoraPair;
use crate::values::metadata_from_py;

/// Adds the adapter class and the patch function to the module.
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<NativeAdapter>()?;
    m.add_class::<TensorRow>()?;
    m.add_class::<NoteRow>()?;
    m.add_class::<PatchOutcome>()?;
    m.add_class::<PatchProgress>()?;
    m.add_function(wrap_pyfunction!(patch, m)?)?;
    Ok(())
}

/// A loaded LoRA adapter (GGUF, ggla, or tensors from the PEFT converter).
#[pyclass(name = "Adapter", module = "ggml_lora._native", frozen)]
pub struct NativeAdapter {
    /// The core's adapter.
    pub inner: Arc<LoraAdapter>,
}

/// One target of a PEFT plan, read from the Python object's attributes (`ggml_lora.convert.core.TargetPlan`).
#[derive(FromPyObject)]
struct TargetPlan {
    target: String,
    a: String,
    b: String,
    magnitude: Option<String>,
    embedding: bool,
    r: usize,
    alpha: f64,
    permute: Option<(usize, usize)>,
}

/// A PEFT plan, read from the Python object's attributes (`ggml_lora.convert.core.PeftPlan`).
#[derive(FromPyObject)]
struct Plan {
    source: String,
    architecture: String,
    use_rslora: bool,
    targets: Vec<TargetPlan>,
}

impl From<Plan> for PeftPlan {
    fn from(plan: Plan) -> PeftPlan {
        PeftPlan {
            source: plan.source,
            architecture: plan.architecture,
            use_rslora: plan.use_rslora,
            targets: plan
                .targets
                .into_iter()
                .map(|t| PeftTarget {
                    target: t.target,
                    a: t.a,
                    b: t.b,
                    magnitude: t.magnitude,
                    kind: if t.embedding { ModuleKind::Embedding } else { ModuleKind::Linear },
                    r: t.r,
                    alpha: t.alpha,
                    permute: t.permute,
                })
                .collect(),
        }
    }
}

/// `(tensor name, f32 array)` of an adapter in llama.cpp's GGUF layout.
type GgufTensor<'py> = (String, Bound<'py, PyArrayDyn<f32>>);

#[pymethods]
impl NativeAdapter {
    /// Loads a llama.cpp GGUF LoRA adapter or a legacy ggla file (chosen by its magic).
    #[staticmethod]
    fn open(py: Python<'_>, path: PathBuf) -> PyResult<Self> {
        // A FIFO or device is refused before the adapter reader opens it (it would block or read a device).
        let inner = py.detach(|| paths::check_input(&path).and_then(|_| LoraAdapter::open(&path))).py_err()?;
        Ok(NativeAdapter { inner: Arc::new(inner) })
    }

    /// Builds an adapter from `(name, dims in ggml order, type name, raw uint8 data)` tensors in llama.cpp's
    /// adapter naming and layout.
    #[staticmethod]
    #[pyo3(signature = (source, architecture, alpha, tensors))]
    fn from_tensors(
        py: Python<'_>,
        source: String,
        architecture: Option<String>,
        alpha: f32,
        tensors: Vec<(String, Vec<u64>, String, PyReadonlyArrayDyn<'_, u8>)>,
    ) -> PyResult<Self> {
        let mut infos = Vec::with_capacity(tensors.len());
        let mut data = Vec::with_capacity(tensors.len());
        for (name, dims, ty, array) in &tensors {
            let ty = ggml_type(ty)?;
            let nbytes = tensor_nbytes(name, dims, ty).map_err(|e| PyValueError::new_err(e.to_string()))?;
            let bytes = array.as_slice().map_err(|e| PyValueError::new_err(format!("tensor {name:?}: {e}")))?;
            if bytes.len() as u64 != nbytes {
                return Err(PyValueError::new_err(format!(
                    "tensor {name:?}: {} bytes given, its dims and type need {nbytes}",
                    bytes.len()
                )));
            }
            infos.push(TensorInfo { name: name.clone(), dims: dims.clone(), ty, relative_offset: 0, nbytes });
            data.push(bytes);
        }
        let inner = py
            .detach(|| {
                let refs: Vec<(&TensorInfo, &[u8])> = infos.iter().zip(data.iter().copied()).collect();
                adapter::from_tensors(source, architecture, alpha, &refs)
            })
            .py_err()?;
        Ok(NativeAdapter { inner: Arc::new(inner) })
    }

    /// Builds a PEFT folder's adapter from its open weights file and a plan (an object with `source`,
    /// `architecture`, `use_rslora` and `targets`, each target with `target`, `a`, `b`, `magnitude`,
    /// `embedding`, `r`, `alpha`, `permute`). The factors stay in the file until their target is patched.
    #[staticmethod]
    fn from_peft(py: Python<'_>, weights: PyRef<'_, NativePeftWeights>, plan: Plan) -> PyResult<Self> {
        let (weights, plan) = (Arc::clone(&weights.inner), PeftPlan::from(plan));
        let inner = py.detach(|| peft::build(weights, &plan)).py_err()?;
        Ok(NativeAdapter { inner: Arc::new(inner) })
    }

    /// Every pair in llama.cpp's GGUF adapter layout, in pair order: `<target>.lora_a`, `<target>.lora_b` and,
    /// for DoRA, `<target>.dora_m`, as float32 arrays (numpy shapes: linear (r, n_in) and (n_out, r);
    /// token_embd (n_vocab, r) and (n_embd, r); dora_m (n_out,)).
    fn gguf_tensors<'py>(&self, py: Python<'py>) -> PyResult<Vec<GgufTensor<'py>>> {
        let mut out = Vec::with_capacity(self.inner.pairs.len() * 2);
        for pair in &self.inner.pairs {
            let (a, a_shape, b, b_shape) = py.detach(|| pair.gguf_layout()).py_err()?;
            out.push((format!("{}.lora_a", pair.target), PyArray1::from_vec(py, a).reshape(a_shape.to_vec())?));
            out.push((format!("{}.lora_b", pair.target), PyArray1::from_vec(py, b).reshape(b_shape.to_vec())?));
            if let Some(m) = &pair.magnitude {
                let len = vec![m.len()];
                out.push((format!("{}.dora_m", pair.target), PyArray1::from_slice(py, m).reshape(len)?));
            }
        }
        Ok(out)
    }

    /// Where the adapter came from.
    #[getter]
    fn source(&self) -> &str {
        &self.inner.source
    }

    /// `general.architecture` of the adapter, if it says.
    #[getter]
    fn architecture(&self) -> Option<&str> {
        self.inner.architecture.as_deref()
    }

    /// LoRA alpha (0 = absent).
    #[getter]
    fn alpha(&self) -> f32 {
        self.inner.alpha
    }

    /// Tensors ignored as llama.cpp ignores them (1-D norm vectors).
    #[getter]
    fn skipped(&self) -> Vec<String> {
        self.inner.skipped.clone()
    }

    /// Every pair of the adapter.
    fn pairs(&self) -> Vec<LoraPair> {
        self.inner
            .pairs
            .iter()
            .map(|p| LoraPair {
                target: p.target.clone(),
                rows: p.rows,
                cols: p.cols,
                rank: p.rank,
                scale: self.inner.pair_scale(p, 1.0),
                dora: p.magnitude.is_some(),
            })
            .collect()
    }
}

/// One patched tensor of a finished patch, with named fields (the core's `TensorReport` and its metrics).
#[pyclass(name = "TensorReport", module = "ggml_lora._native", frozen, get_all)]
pub struct TensorRow {
    name: String,
    model_type: &'static str,
    out_type: &'static str,
    from_base: bool,
    n_adapters: usize,
    relative_change: f64,
    retained: f64,
    cosine: f64,
    error_ratio: f64,
    used_imatrix: bool,
    promoted_from: Option<&'static str>,
    retained_before_promotion: Option<f64>,
    extra_bytes: u64,
}

/// Something worth knowing about a finished patch that is not an error (the core's `PatchNote`): its `kind` and
/// facts, for Python to put into words. Fields that do not belong to the kind are `None` (`tensors` empty).
#[pyclass(name = "PatchNote", module = "ggml_lora._native", frozen, get_all)]
pub struct NoteRow {
    kind: &'static str,
    source: Option<String>,
    tensors: Vec<String>,
    file: Option<String>,
    requantized: Option<usize>,
}

impl From<&PatchNote> for NoteRow {
    fn from(note: &PatchNote) -> NoteRow {
        let row = NoteRow { kind: note.kind(), source: None, tensors: Vec::new(), file: None, requantized: None };
        match note {
            PatchNote::ImatrixMissingEntries { source, tensors } => {
                NoteRow { source: Some(source.clone()), tensors: tensors.clone(), ..row }
            }
            PatchNote::ModelImatrixNotApplied { file, requantized } => {
                NoteRow { file: file.clone(), requantized: Some(*requantized), ..row }
            }
        }
    }
}

#[pymethods]
impl NoteRow {
    /// `PatchNote(kind='...', <the kind's fields>)`.
    fn __repr__(&self, py: Python<'_>) -> PyResult<String> {
        let fields: Vec<(&str, Bound<'_, PyAny>)> = match self.kind {
            "imatrix_missing_entries" => vec![
                ("source", self.source.clone().into_pyobject(py)?.into_any()),
                ("tensors", self.tensors.clone().into_pyobject(py)?.into_any()),
            ],
            _ => vec![
                ("file", self.file.clone().into_pyobject(py)?.into_any()),
                ("requantized", self.requantized.into_pyobject(py)?.into_any()),
            ],
        };
        let mut text = format!("PatchNote(kind={}", PyString::new(py, self.kind).repr()?);
        for (name, value) in fields {
            text.push_str(&format!(", {name}={}", value.repr()?));
        }
        text.push(')');
        Ok(text)
    }
}

/// Runs a patch; returns `(output paths in shard order, per-tensor reports, tensors copied, bytes written, seconds,
/// notes)`.
/// `imatrix` is `(source, [(tensor name, weights)])`; `tensor_types` `[(pattern, type name)]`.
/// `written`: a list to which the output path is appended as soon as it has been renamed into place, before
/// any Python code runs again, so an interrupt handled later can tell that the output is complete.
#[pyfunction]
#[pyo3(signature = (model, adapters, base, out, *, out_type = None, intermediate = None, threads = None,
                    sync = true, extra_metadata = None, progress = None, tensor_types = Vec::new(),
                    imatrix = None, keep_lora = None, split = None, written = None))]
#[allow(clippy::too_many_arguments, clippy::type_complexity)]
fn patch(
    py: Python<'_>,
    model: PathBuf,
    adapters: Vec<(PyRef<'_, NativeAdapter>, f32)>,
    base: Option<PathBuf>,
    out: PathBuf,
    out_type: Option<&str>,
    intermediate: Option<&str>,
    threads: Option<usize>,
    sync: bool,
    extra_metadata: Option<Bound<'_, PyDict>>,
    progress: Option<Py<PyAny>>,
    tensor_types: Vec<(String, String)>,
    imatrix: Option<(String, Vec<(String, Vec<f32>)>)>,
    keep_lora: Option<f64>,
    split: Option<PyRef<'_, PySplitRule>>,
    written: Option<Bound<'_, PyList>>,
) -> PyResult<PatchOutcome> {
    paths::check_output(&out).py_err()?;
    let metadata = extra_metadata.as_ref().map(metadata_from_py).transpose()?.unwrap_or_default();
    let options = PatchOptions {
        out_type: out_type.map(ggml_type).transpose()?,
        intermediate: intermediate.map(ggml_type).transpose()?,
        threads,
        sync,
        extra_metadata: metadata,
        tensor_types: tensor_types
            .into_iter()
            .map(|(pattern, ty)| Ok((pattern, ggml_type(&ty)?)))
            .collect::<PyResult<Vec<_>>>()?,
        imatrix: imatrix
            .map(|(source, entries)| Arc::new(Imatrix::from_entries(source, entries.into_iter().collect()))),
        keep_lora,
        split: split.map(|s| s.rule).unwrap_or_default(),
    };
    let inputs: Vec<AdapterInput> =
        adapters.iter().map(|(a, scale)| AdapterInput { adapter: Arc::clone(&a.inner), scale: *scale }).collect();
    let mut callback_error: Option<PyErr> = None;
    let result = py.detach(|| {
        let model = ModelFile::open(&model)?;
        let base = base.as_ref().map(ModelFile::open).transpose()?;
        let plan = PatchPlan::new(&model, base.as_ref(), &inputs, options)?;
        let mut on_progress = |p: &ggml_lora_core::patch::Progress<'_>| -> Result<(), Error> {
            Python::attach(|py| {
                let outcome = py.check_signals().and_then(|_| match &progress {
                    Some(cb) => {
                        let progress = PatchProgress {
                            tensors_done: p.tensors_done,
                            tensors_total: p.tensors_total,
                            tensor: p.tensor.to_owned(),
                            bytes_done: p.bytes_done,
                            bytes_total: p.bytes_total,
                        };
                        cb.call1(py, (progress,)).map(|_| ())
                    }
                    None => Ok(()),
                });
                outcome.map_err(|e| {
                    callback_error = Some(e);
                    Error::Cancelled("interrupted during the patch; no output was written".into())
                })
            })
        };
        plan.run(&out, &mut on_progress)
    });
    if let (Ok(report), Some(list)) = (&result, &written) {
        // A str (no Python code runs to build it), so a pending interrupt cannot fire before it is recorded.
        for path in &report.outputs {
            list.append(path.as_os_str())?;
        }
    }
    if let Some(err) = callback_error {
        return Err(err);
    }
    let report = result.py_err()?;
    let rows = report
        .tensors
        .iter()
        .map(|t| {
            Py::new(
                py,
                TensorRow {
                    name: t.name.clone(),
                    model_type: t.model_type.name(),
                    out_type: t.out_type.name(),
                    from_base: t.from_base,
                    n_adapters: t.n_adapters,
                    relative_change: t.relative_change(),
                    retained: t.retained(),
                    cosine: t.cosine(),
                    error_ratio: t.error_ratio(),
                    used_imatrix: t.used_imatrix,
                    promoted_from: t.promoted_from.map(|(ty, _)| ty.name()),
                    retained_before_promotion: t.promoted_from.map(|(_, r)| r),
                    extra_bytes: t.extra_bytes(),
                },
            )
        })
        .collect::<PyResult<Vec<_>>>()?;
    let notes = report.notes.iter().map(|n| Py::new(py, NoteRow::from(n))).collect::<PyResult<Vec<_>>>()?;
    Ok(PatchOutcome {
        outputs: report.outputs,
        tensors: rows,
        copied: report.copied,
        bytes_written: report.bytes_written,
        seconds: report.seconds,
        notes,
    })
}

/// Where a running patch is: tensors and output bytes done out of the totals (passed to the progress callback).
#[pyclass(name = "PatchProgress", module = "ggml_lora._native", frozen, get_all)]
pub struct PatchProgress {
    /// Tensors written so far (copied or patched).
    tensors_done: usize,
    /// Tensors in the output.
    tensors_total: usize,
    /// The tensor being worked on (the last one written when `tensors_done == tensors_total`).
    tensor: String,
    /// Output bytes written so far.
    bytes_done: u64,
    /// Output bytes in all.
    bytes_total: u64,
}

#[pymethods]
impl PatchProgress {
    /// `PatchProgress(tensors_done=3, tensors_total=201, tensor='blk.0.attn_k.weight', bytes_done=..., bytes_total=...)`.
    fn __repr__(&self, py: Python<'_>) -> PyResult<String> {
        Ok(format!(
            "PatchProgress(tensors_done={}, tensors_total={}, tensor={}, bytes_done={}, bytes_total={})",
            self.tensors_done,
            self.tensors_total,
            PyString::new(py, &self.tensor).repr()?,
            self.bytes_done,
            self.bytes_total
        ))
    }
}

/// What a finished patch did: its output files, a report per patched tensor, and notes.
#[pyclass(name = "PatchOutcome", module = "ggml_lora._native", frozen, get_all)]
pub struct PatchOutcome {
    /// The output files, in shard order (one file unless the output is split).
    outputs: Vec<PathBuf>,
    /// One report per patched tensor, in file order.
    tensors: Vec<Py<TensorRow>>,
    /// Tensors copied from the model unchanged.
    copied: usize,
    /// Bytes written, every output file together.
    bytes_written: u64,
    /// Wall time of the patch, in seconds.
    seconds: f64,
    /// Things worth knowing about the result.
    notes: Vec<Py<NoteRow>>,
}

#[pymethods]
impl PatchOutcome {
    /// `PatchOutcome(outputs=[...], tensors=<n patched>, copied=..., bytes_written=..., seconds=..., notes=<n>)`.
    fn __repr__(&self) -> String {
        format!(
            "PatchOutcome(outputs={:?}, tensors=<{} patched>, copied={}, bytes_written={}, seconds={:.3}, notes=<{}>)",
            self.outputs,
            self.tensors.len(),
            self.copied,
            self.bytes_written,
            self.seconds,
            self.notes.len()
        )
    }
}
