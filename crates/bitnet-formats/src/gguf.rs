//! GGUF v2/v3 reader (little-endian), written from the format description in
//! REFERENCE.md section 2. The file is memory-mapped; tensor data is handed out as byte slices
//! into the map and never copied here.
//!
//! Every length, count and offset read from the file is checked against what is left of the
//! file before anything is allocated, so a hostile file gives an error, not a huge allocation.

use crate::bail;
use crate::error::{FormatError, Result};
use memmap2::Mmap;
use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub const GGUF_MAGIC: &[u8; 4] = b"GGUF";
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// Largest number of dimensions ggml allows.
const MAX_DIMS: u32 = 4;

/// Tensor element types this engine reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[allow(non_camel_case_types)]
pub enum GgmlType {
    F32,
    F16,
    Q8_0,
    Q6_K,
    BF16,
    TQ1_0,
    TQ2_0,
    I2_S,
}

impl GgmlType {
    pub fn from_id(id: u32) -> Option<GgmlType> {
        Some(match id {
            0 => GgmlType::F32,
            1 => GgmlType::F16,
            8 => GgmlType::Q8_0,
            14 => GgmlType::Q6_K,
            30 => GgmlType::BF16,
            34 => GgmlType::TQ1_0,
            35 => GgmlType::TQ2_0,
            36 => GgmlType::I2_S,
            _ => return None,
        })
    }

    pub fn id(self) -> u32 {
        match self {
            GgmlType::F32 => 0,
            GgmlType::F16 => 1,
            GgmlType::Q8_0 => 8,
            GgmlType::Q6_K => 14,
            GgmlType::BF16 => 30,
            GgmlType::TQ1_0 => 34,
            GgmlType::TQ2_0 => 35,
            GgmlType::I2_S => 36,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            GgmlType::F32 => "F32",
            GgmlType::F16 => "F16",
            GgmlType::Q8_0 => "Q8_0",
            GgmlType::Q6_K => "Q6_K",
            GgmlType::BF16 => "BF16",
            GgmlType::TQ1_0 => "TQ1_0",
            GgmlType::TQ2_0 => "TQ2_0",
            GgmlType::I2_S => "I2_S",
        }
    }

    /// (elements per block, bytes per block). I2_S is special: 128-element blocks of 32 bytes
    /// over the whole flattened tensor, plus 32 trailing bytes (see [`GgmlType::data_size`]).
    pub fn block(self) -> (u64, u64) {
        match self {
            GgmlType::F32 => (1, 4),
            GgmlType::F16 | GgmlType::BF16 => (1, 2),
            GgmlType::Q8_0 => (32, 34),
            GgmlType::Q6_K => (256, 210),
            GgmlType::TQ1_0 => (256, 54),
            GgmlType::TQ2_0 => (256, 66),
            GgmlType::I2_S => (128, 32),
        }
    }

    /// Whether rows must be a whole number of blocks (true for every block type except I2_S,
    /// whose blocks run across rows).
    pub fn row_blocked(self) -> bool {
        !matches!(self, GgmlType::I2_S) && self.block().0 > 1
    }

    /// Bytes of a tensor with `ne0` elements per row and `n` elements in all.
    pub fn data_size(self, ne0: u64, n: u64) -> Result<u64> {
        let (bs, bb) = self.block();
        if self == GgmlType::I2_S {
            if !n.is_multiple_of(128) {
                bail!("I2_S needs a multiple of 128 elements, got {n}");
            }
            return Ok(n / 4 + 32);
        }
        if !ne0.is_multiple_of(bs) {
            bail!(
                "{} needs rows that are a multiple of {bs} elements, got {ne0}",
                self.name()
            );
        }
        (n / bs)
            .checked_mul(bb)
            .ok_or_else(|| FormatError::new("tensor size overflows"))
    }
}

impl fmt::Display for GgmlType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Name of a ggml type id we do not read, for error messages.
fn ggml_type_name(id: u32) -> &'static str {
    const NAMES: [&str; 40] = [
        "F32", "F16", "Q4_0", "Q4_1", "Q4_2", "Q4_3", "Q5_0", "Q5_1", "Q8_0", "Q8_1", "Q2_K",
        "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_K", "IQ2_XXS", "IQ2_XS", "IQ3_XXS", "IQ1_S", "IQ4_NL",
        "IQ3_S", "IQ2_S", "IQ4_XS", "I8", "I16", "I32", "I64", "F64", "IQ1_M", "BF16", "Q4_0_4_4",
        "Q4_0_4_8", "Q4_0_8_8", "TQ1_0", "TQ2_0", "I2_S", "I8_S", "TL1", "TL2",
    ];
    NAMES.get(id as usize).copied().unwrap_or("unknown")
}

/// A metadata value. Arrays hold values of one type (checked on read).
#[derive(Debug, Clone, PartialEq)]
pub enum MetaValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    Str(String),
    Array(Vec<MetaValue>),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl MetaValue {
    pub fn type_name(&self) -> &'static str {
        match self {
            MetaValue::U8(_) => "u8",
            MetaValue::I8(_) => "i8",
            MetaValue::U16(_) => "u16",
            MetaValue::I16(_) => "i16",
            MetaValue::U32(_) => "u32",
            MetaValue::I32(_) => "i32",
            MetaValue::F32(_) => "f32",
            MetaValue::Bool(_) => "bool",
            MetaValue::Str(_) => "string",
            MetaValue::Array(_) => "array",
            MetaValue::U64(_) => "u64",
            MetaValue::I64(_) => "i64",
            MetaValue::F64(_) => "f64",
        }
    }

    /// Any integer type as i128 (so every value fits), else None.
    pub fn as_int(&self) -> Option<i128> {
        Some(match *self {
            MetaValue::U8(v) => v as i128,
            MetaValue::I8(v) => v as i128,
            MetaValue::U16(v) => v as i128,
            MetaValue::I16(v) => v as i128,
            MetaValue::U32(v) => v as i128,
            MetaValue::I32(v) => v as i128,
            MetaValue::U64(v) => v as i128,
            MetaValue::I64(v) => v as i128,
            _ => return None,
        })
    }

    /// A non-negative integer that fits in u64.
    pub fn as_u64(&self) -> Option<u64> {
        self.as_int().and_then(|v| u64::try_from(v).ok())
    }

    /// Any float or integer value as f64.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            MetaValue::F32(v) => Some(v as f64),
            MetaValue::F64(v) => Some(v),
            _ => self.as_int().map(|v| v as f64),
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            MetaValue::Bool(v) => Some(v),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            MetaValue::Str(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[MetaValue]> {
        match self {
            MetaValue::Array(a) => Some(a),
            _ => None,
        }
    }

    /// Short human form for `bitnet info` (arrays are summarised).
    pub fn summary(&self) -> String {
        match self {
            MetaValue::Str(s) => {
                let one_line: String = s.chars().take(80).collect::<String>().replace('\n', "\\n");
                if s.chars().count() > 80 {
                    format!("{one_line:?}...")
                } else {
                    format!("{one_line:?}")
                }
            }
            MetaValue::Array(a) => {
                let ty = a.first().map(|v| v.type_name()).unwrap_or("empty");
                format!("[{ty}; {}]", a.len())
            }
            MetaValue::F32(v) => format!("{v}"),
            MetaValue::F64(v) => format!("{v}"),
            MetaValue::Bool(v) => format!("{v}"),
            other => format!("{}", other.as_int().unwrap_or_default()),
        }
    }
}

/// One tensor's description. `dims` are in GGUF order, innermost first: `dims[0]` is the row
/// length (ne0). `offset` is absolute in the file.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    pub dims: Vec<u64>,
    pub dtype: GgmlType,
    pub offset: u64,
    pub size: u64,
}

impl TensorInfo {
    pub fn n_elements(&self) -> u64 {
        self.dims.iter().product()
    }

    /// Row length (ne0).
    pub fn ne0(&self) -> u64 {
        self.dims.first().copied().unwrap_or(1)
    }

    /// Number of rows (product of all dims but the first).
    pub fn n_rows(&self) -> u64 {
        self.dims.iter().skip(1).product()
    }
}

/// The parsed header of a GGUF file: version, metadata and tensor table.
#[derive(Debug, Clone)]
pub struct GgufHeader {
    pub version: u32,
    pub metadata: Vec<(String, MetaValue)>,
    pub tensors: Vec<TensorInfo>,
    pub alignment: u64,
    pub data_offset: u64,
}

/// Byte cursor with bounds-checked reads.
struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8]> {
        if n > self.remaining() {
            bail!(
                "file is truncated: {} needs {n} bytes at offset {} but only {} remain",
                what.escape_debug(),
                self.pos,
                self.remaining()
            );
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        let s = self.take(N, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    /// A count that will be used to size a collection: it must be plausible given the bytes
    /// left, with each element taking at least `min_elem_bytes`.
    fn count(&mut self, what: &str, min_elem_bytes: usize) -> Result<usize> {
        let n = self.u64(what)?;
        let max = self.remaining() / min_elem_bytes.max(1);
        if n > max as u64 {
            bail!("{what} = {n} is larger than the rest of the file allows ({max}): truncated or corrupt file");
        }
        Ok(n as usize)
    }

    fn string(&mut self, what: &str) -> Result<String> {
        let n = self.count(what, 1)?;
        let bytes = self.take(n, what)?;
        String::from_utf8(bytes.to_vec())
            .map_err(|_| FormatError::new(format!("{what} is not valid UTF-8")))
    }
}

/// Minimum encoded size of one value of a metadata type, for count checks.
fn min_value_size(ty: u32) -> usize {
    match ty {
        0 | 1 | 7 => 1,
        2 | 3 => 2,
        4..=6 => 4,
        8 => 8,
        9 => 12,
        _ => 8,
    }
}

fn read_value(c: &mut Cursor, ty: u32, key: &str, depth: u32) -> Result<MetaValue> {
    Ok(match ty {
        0 => MetaValue::U8(c.array::<1>(key)?[0]),
        1 => MetaValue::I8(c.array::<1>(key)?[0] as i8),
        2 => MetaValue::U16(u16::from_le_bytes(c.array(key)?)),
        3 => MetaValue::I16(i16::from_le_bytes(c.array(key)?)),
        4 => MetaValue::U32(u32::from_le_bytes(c.array(key)?)),
        5 => MetaValue::I32(i32::from_le_bytes(c.array(key)?)),
        6 => MetaValue::F32(f32::from_le_bytes(c.array(key)?)),
        7 => match c.array::<1>(key)?[0] {
            0 => MetaValue::Bool(false),
            1 => MetaValue::Bool(true),
            b => bail!("metadata key {key:?}: invalid bool byte {b}"),
        },
        8 => MetaValue::Str(c.string(key)?),
        9 => {
            if depth >= 4 {
                bail!("metadata key {key:?}: arrays nested too deeply");
            }
            let elem_ty = c.u32(key)?;
            if elem_ty > 12 {
                bail!("metadata key {key:?}: unknown array element type {elem_ty}");
            }
            let n = c.count(key, min_value_size(elem_ty))?;
            let mut items = Vec::with_capacity(n);
            for _ in 0..n {
                items.push(read_value(c, elem_ty, key, depth + 1)?);
            }
            MetaValue::Array(items)
        }
        10 => MetaValue::U64(u64::from_le_bytes(c.array(key)?)),
        11 => MetaValue::I64(i64::from_le_bytes(c.array(key)?)),
        12 => MetaValue::F64(f64::from_le_bytes(c.array(key)?)),
        _ => bail!("metadata key {key:?}: unknown value type {ty}"),
    })
}

/// Parse a GGUF header from the whole file's bytes and check every tensor against the file
/// size. This is the fuzzing entry point: it must return an error, never panic, on any input.
pub fn parse_header(buf: &[u8]) -> Result<GgufHeader> {
    let mut c = Cursor { buf, pos: 0 };
    let magic = c
        .take(4, "magic")
        .map_err(|_| FormatError::new("not a GGUF file (too short)"))?;
    if magic != GGUF_MAGIC {
        bail!("not a GGUF file (bad magic {magic:02x?})");
    }
    let version = c.u32("version")?;
    if version != 2 && version != 3 {
        bail!("unsupported GGUF version {version} (only 2 and 3 are read)");
    }
    let n_tensors = c.count("tensor count", 24)?;
    let n_kv = c.count("metadata count", 13)?;

    let mut metadata: Vec<(String, MetaValue)> = Vec::with_capacity(n_kv);
    // Duplicate keys are found with a set: scanning `metadata` for each key was quadratic, and a
    // 4 MB file of 200,000 small key-value pairs took three minutes to parse (a hang; see
    // tests/fuzz_regressions.rs, `many_metadata_keys_parse_in_linear_time`).
    let mut keys = std::collections::HashSet::with_capacity(n_kv);
    for _ in 0..n_kv {
        let key = c.string("metadata key")?;
        let ty = c.u32(&key)?;
        let value = read_value(&mut c, ty, &key, 0)?;
        if !keys.insert(key.clone()) {
            bail!("metadata key {key:?} appears twice");
        }
        metadata.push((key, value));
    }

    let alignment = match metadata.iter().find(|(k, _)| k == "general.alignment") {
        None => DEFAULT_ALIGNMENT,
        Some((_, v)) => match v.as_u64() {
            Some(a) if a > 0 && a.is_power_of_two() && a <= 1 << 20 => a,
            _ => bail!(
                "metadata key \"general.alignment\" must be a power of two, got {}",
                v.summary()
            ),
        },
    };

    struct Raw {
        name: String,
        dims: Vec<u64>,
        type_id: u32,
        rel_offset: u64,
    }
    let mut raws = Vec::with_capacity(n_tensors);
    let mut names = std::collections::HashSet::with_capacity(n_tensors);
    for _ in 0..n_tensors {
        let name = c.string("tensor name")?;
        let n_dims = c.u32(&name)?;
        if n_dims == 0 || n_dims > MAX_DIMS {
            bail!("tensor {name:?}: {n_dims} dimensions (1 to {MAX_DIMS} allowed)");
        }
        let mut dims = Vec::with_capacity(n_dims as usize);
        for _ in 0..n_dims {
            dims.push(c.u64(&name)?);
        }
        let type_id = c.u32(&name)?;
        let rel_offset = c.u64(&name)?;
        if !names.insert(name.clone()) {
            bail!("tensor {name:?} appears twice");
        }
        raws.push(Raw {
            name,
            dims,
            type_id,
            rel_offset,
        });
    }

    let data_offset = align_up(c.pos as u64, alignment);
    let file_len = buf.len() as u64;
    let mut tensors = Vec::with_capacity(raws.len());
    for r in raws {
        let name = r.name;
        let dtype = GgmlType::from_id(r.type_id).ok_or_else(|| {
            FormatError::new(format!(
                "tensor {name:?} has type {} ({}), which bitnet-rs does not read",
                r.type_id,
                ggml_type_name(r.type_id)
            ))
        })?;
        let mut n: u64 = 1;
        for &d in &r.dims {
            if d == 0 {
                bail!("tensor {name:?} has a zero dimension {:?}", r.dims);
            }
            n = n.checked_mul(d).filter(|&n| n < 1 << 40).ok_or_else(|| {
                FormatError::new(format!("tensor {name:?}: dimensions {:?} overflow", r.dims))
            })?;
        }
        let size = dtype
            .data_size(r.dims[0], n)
            .map_err(|e| e.context(format!("tensor {name:?}")))?;
        if r.rel_offset % alignment != 0 {
            bail!(
                "tensor {name:?}: data offset {} is not aligned to {alignment}",
                r.rel_offset
            );
        }
        let start = data_offset
            .checked_add(r.rel_offset)
            .ok_or_else(|| FormatError::new(format!("tensor {name:?}: offset overflows")))?;
        let end = start
            .checked_add(size)
            .ok_or_else(|| FormatError::new(format!("tensor {name:?}: offset overflows")))?;
        if end > file_len {
            bail!(
                "tensor {name:?} ({dtype}, {:?}) needs bytes {start}..{end} but the file has {file_len} bytes (truncated or corrupt)",
                r.dims
            );
        }
        tensors.push(TensorInfo {
            name,
            dims: r.dims,
            dtype,
            offset: start,
            size,
        });
    }
    Ok(GgufHeader {
        version,
        metadata,
        tensors,
        alignment,
        data_offset,
    })
}

pub fn align_up(x: u64, a: u64) -> u64 {
    x.div_ceil(a) * a
}

/// A memory-mapped GGUF file.
pub struct GgufFile {
    pub path: PathBuf,
    pub header: GgufHeader,
    index: HashMap<String, usize>,
    map: Arc<Mmap>,
}

impl GgufFile {
    /// Open and validate a GGUF file. Errors name the file.
    pub fn open(path: impl AsRef<Path>) -> Result<GgufFile> {
        let path = path.as_ref().to_path_buf();
        let ctx = path.display().to_string();
        let file = std::fs::File::open(&path)
            .map_err(|e| FormatError::new(e.to_string()).context(&ctx))?;
        // SAFETY: the map is read-only; like every mmap-based loader we assume the file is not
        // modified while it is open.
        let map = unsafe { Mmap::map(&file) }
            .map_err(|e| FormatError::new(e.to_string()).context(&ctx))?;
        let header = parse_header(&map).map_err(|e| e.context(&ctx))?;
        let index = header
            .tensors
            .iter()
            .enumerate()
            .map(|(i, t)| (t.name.clone(), i))
            .collect();
        Ok(GgufFile {
            path,
            header,
            index,
            map: Arc::new(map),
        })
    }

    pub fn version(&self) -> u32 {
        self.header.version
    }

    pub fn metadata(&self) -> &[(String, MetaValue)] {
        &self.header.metadata
    }

    pub fn tensors(&self) -> &[TensorInfo] {
        &self.header.tensors
    }

    pub fn get(&self, key: &str) -> Option<&MetaValue> {
        self.header
            .metadata
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v)
    }

    fn wrong_type(&self, key: &str, want: &str, v: &MetaValue) -> FormatError {
        FormatError::new(format!(
            "{}: metadata key {key:?} should be {want}, found {}",
            self.path.display(),
            v.summary()
        ))
    }

    pub fn get_str(&self, key: &str) -> Result<Option<&str>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_str()
                .map(Some)
                .ok_or_else(|| self.wrong_type(key, "a string", v)),
        }
    }

    pub fn get_u64(&self, key: &str) -> Result<Option<u64>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .map(Some)
                .ok_or_else(|| self.wrong_type(key, "a non-negative integer", v)),
        }
    }

    pub fn get_f64(&self, key: &str) -> Result<Option<f64>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| self.wrong_type(key, "a number", v)),
        }
    }

    pub fn get_bool(&self, key: &str) -> Result<Option<bool>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_bool()
                .map(Some)
                .ok_or_else(|| self.wrong_type(key, "a bool", v)),
        }
    }

    /// A string array (for example `tokenizer.ggml.tokens`).
    pub fn get_str_array(&self, key: &str) -> Result<Option<Vec<&str>>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => {
                let arr = v
                    .as_array()
                    .ok_or_else(|| self.wrong_type(key, "an array of strings", v))?;
                arr.iter()
                    .map(|x| {
                        x.as_str()
                            .ok_or_else(|| self.wrong_type(key, "an array of strings", v))
                    })
                    .collect::<Result<Vec<_>>>()
                    .map(Some)
            }
        }
    }

    /// An integer array (for example `tokenizer.ggml.token_type`).
    pub fn get_int_array(&self, key: &str) -> Result<Option<Vec<i64>>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => {
                let arr = v
                    .as_array()
                    .ok_or_else(|| self.wrong_type(key, "an array of integers", v))?;
                arr.iter()
                    .map(|x| {
                        x.as_int()
                            .and_then(|i| i64::try_from(i).ok())
                            .ok_or_else(|| self.wrong_type(key, "an array of integers", v))
                    })
                    .collect::<Result<Vec<_>>>()
                    .map(Some)
            }
        }
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.index.get(name).map(|&i| &self.header.tensors[i])
    }

    /// The raw bytes of a tensor (bounds were checked at open).
    pub fn tensor_data(&self, t: &TensorInfo) -> &[u8] {
        &self.map[t.offset as usize..(t.offset + t.size) as usize]
    }

    /// The shared memory map, for zero-copy weight views that outlive this struct.
    pub fn map(&self) -> Arc<Mmap> {
        self.map.clone()
    }
}

/// Is this file a GGUF file (by its magic)?
pub fn is_gguf(path: &Path) -> bool {
    use std::io::Read;
    let mut magic = [0u8; 4];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut magic))
        .is_ok()
        && &magic == GGUF_MAGIC
}

/// A minimal GGUF writer, used by tests (hostile-file cases) and tools. Tensors are written
/// in the order given, each aligned.
pub struct GgufWriter {
    pub version: u32,
    pub alignment: u64,
    pub metadata: Vec<(String, MetaValue)>,
    /// (name, dims innermost first, type id, raw bytes)
    pub tensors: Vec<(String, Vec<u64>, u32, Vec<u8>)>,
}

impl Default for GgufWriter {
    fn default() -> Self {
        GgufWriter {
            version: 3,
            alignment: DEFAULT_ALIGNMENT,
            metadata: Vec::new(),
            tensors: Vec::new(),
        }
    }
}

fn value_type_id(v: &MetaValue) -> u32 {
    match v {
        MetaValue::U8(_) => 0,
        MetaValue::I8(_) => 1,
        MetaValue::U16(_) => 2,
        MetaValue::I16(_) => 3,
        MetaValue::U32(_) => 4,
        MetaValue::I32(_) => 5,
        MetaValue::F32(_) => 6,
        MetaValue::Bool(_) => 7,
        MetaValue::Str(_) => 8,
        MetaValue::Array(_) => 9,
        MetaValue::U64(_) => 10,
        MetaValue::I64(_) => 11,
        MetaValue::F64(_) => 12,
    }
}

fn write_value(out: &mut Vec<u8>, v: &MetaValue) {
    match v {
        MetaValue::U8(x) => out.push(*x),
        MetaValue::I8(x) => out.push(*x as u8),
        MetaValue::U16(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::I16(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::U32(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::I32(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::F32(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::Bool(x) => out.push(*x as u8),
        MetaValue::Str(s) => {
            out.extend_from_slice(&(s.len() as u64).to_le_bytes());
            out.extend_from_slice(s.as_bytes());
        }
        MetaValue::Array(items) => {
            let ty = items.first().map(value_type_id).unwrap_or(0);
            out.extend_from_slice(&ty.to_le_bytes());
            out.extend_from_slice(&(items.len() as u64).to_le_bytes());
            for it in items {
                write_value(out, it);
            }
        }
        MetaValue::U64(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::I64(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::F64(x) => out.extend_from_slice(&x.to_le_bytes()),
    }
}

impl GgufWriter {
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(GGUF_MAGIC);
        out.extend_from_slice(&self.version.to_le_bytes());
        out.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        out.extend_from_slice(&(self.metadata.len() as u64).to_le_bytes());
        for (k, v) in &self.metadata {
            out.extend_from_slice(&(k.len() as u64).to_le_bytes());
            out.extend_from_slice(k.as_bytes());
            out.extend_from_slice(&value_type_id(v).to_le_bytes());
            write_value(&mut out, v);
        }
        let mut rel = 0u64;
        let mut offsets = Vec::new();
        for (name, dims, ty, data) in &self.tensors {
            out.extend_from_slice(&(name.len() as u64).to_le_bytes());
            out.extend_from_slice(name.as_bytes());
            out.extend_from_slice(&(dims.len() as u32).to_le_bytes());
            for d in dims {
                out.extend_from_slice(&d.to_le_bytes());
            }
            out.extend_from_slice(&ty.to_le_bytes());
            out.extend_from_slice(&rel.to_le_bytes());
            offsets.push(rel);
            rel = align_up(rel + data.len() as u64, self.alignment);
        }
        let data_start = align_up(out.len() as u64, self.alignment) as usize;
        out.resize(data_start, 0);
        for ((_, _, _, data), off) in self.tensors.iter().zip(offsets) {
            out.resize(data_start + off as usize, 0);
            out.extend_from_slice(data);
        }
        let end = align_up(out.len() as u64, self.alignment) as usize;
        out.resize(end, 0);
        out
    }
}

/// A GGUF writer that streams tensor data to any `Write` (a file), one tensor at a time, so a
/// converter never holds more than the tensor it is writing. The tensor table (names, dims,
/// types) is given up front, since the header with every offset comes first; the data of each
/// tensor is then written in that order, in as many pieces as convenient, and checked against
/// its size. Alignment is `general.alignment` when the metadata has it, else 32.
pub struct GgufStreamWriter<W: std::io::Write> {
    out: W,
    alignment: u64,
    /// (name, data size) of every tensor, in file order.
    plan: Vec<(String, u64)>,
    /// Index of the tensor being written.
    next: usize,
    /// Bytes of it written so far.
    done: u64,
    /// Bytes written to `out`.
    pos: u64,
}

impl<W: std::io::Write> GgufStreamWriter<W> {
    /// Write the header (GGUF v3): metadata, then the tensor table `(name, dims innermost
    /// first, type)`, padded to the alignment.
    pub fn new(
        out: W,
        metadata: &[(String, MetaValue)],
        tensors: &[(String, Vec<u64>, GgmlType)],
    ) -> Result<GgufStreamWriter<W>> {
        let alignment = match metadata.iter().find(|(k, _)| k == "general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some((_, v)) => match v.as_u64() {
                Some(a) if a > 0 && a.is_power_of_two() => a,
                _ => bail!("general.alignment must be a power of two"),
            },
        };
        let mut head = Vec::new();
        head.extend_from_slice(GGUF_MAGIC);
        head.extend_from_slice(&3u32.to_le_bytes());
        head.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
        head.extend_from_slice(&(metadata.len() as u64).to_le_bytes());
        for (k, v) in metadata {
            head.extend_from_slice(&(k.len() as u64).to_le_bytes());
            head.extend_from_slice(k.as_bytes());
            head.extend_from_slice(&value_type_id(v).to_le_bytes());
            write_value(&mut head, v);
        }
        let mut rel = 0u64;
        let mut plan = Vec::with_capacity(tensors.len());
        for (name, dims, ty) in tensors {
            if dims.is_empty() || dims.len() > MAX_DIMS as usize {
                bail!(
                    "tensor {name:?}: {} dimensions (1 to {MAX_DIMS} allowed)",
                    dims.len()
                );
            }
            let n = dims
                .iter()
                .try_fold(1u64, |a, &d| a.checked_mul(d))
                .ok_or_else(|| FormatError::new(format!("tensor {name:?}: dimensions overflow")))?;
            let size = ty
                .data_size(dims[0], n)
                .map_err(|e| e.context(format!("tensor {name:?}")))?;
            head.extend_from_slice(&(name.len() as u64).to_le_bytes());
            head.extend_from_slice(name.as_bytes());
            head.extend_from_slice(&(dims.len() as u32).to_le_bytes());
            for d in dims {
                head.extend_from_slice(&d.to_le_bytes());
            }
            head.extend_from_slice(&ty.id().to_le_bytes());
            head.extend_from_slice(&rel.to_le_bytes());
            plan.push((name.clone(), size));
            rel = align_up(rel + size, alignment);
        }
        let data_start = align_up(head.len() as u64, alignment) as usize;
        head.resize(data_start, 0);
        let mut w = GgufStreamWriter {
            out,
            alignment,
            plan,
            next: 0,
            done: 0,
            pos: 0,
        };
        w.put(&head)?;
        Ok(w)
    }

    fn put(&mut self, bytes: &[u8]) -> Result<()> {
        self.out.write_all(bytes)?;
        self.pos += bytes.len() as u64;
        Ok(())
    }

    /// The name of the tensor whose data comes next, if any.
    pub fn current(&self) -> Option<&str> {
        self.plan.get(self.next).map(|(n, _)| n.as_str())
    }

    /// Append bytes to the current tensor's data.
    pub fn write_data(&mut self, bytes: &[u8]) -> Result<()> {
        let Some((name, size)) = self.plan.get(self.next) else {
            bail!("all tensors are already written");
        };
        if self.done + bytes.len() as u64 > *size {
            bail!("tensor {name:?}: more than its {size} bytes of data");
        }
        self.done += bytes.len() as u64;
        self.put(bytes)
    }

    /// Finish the current tensor (its data must be complete) and pad to the alignment.
    pub fn end_tensor(&mut self) -> Result<()> {
        let Some((name, size)) = self.plan.get(self.next) else {
            bail!("all tensors are already written");
        };
        if self.done != *size {
            bail!(
                "tensor {name:?}: {} of its {size} bytes of data written",
                self.done
            );
        }
        let pad = align_up(self.pos, self.alignment) - self.pos;
        self.put(&vec![0u8; pad as usize])?;
        self.next += 1;
        self.done = 0;
        Ok(())
    }

    /// Write the whole data of the current tensor.
    pub fn write_tensor(&mut self, bytes: &[u8]) -> Result<()> {
        self.write_data(bytes)?;
        self.end_tensor()
    }

    /// Check that every tensor was written, flush, and hand back the writer.
    pub fn finish(mut self) -> Result<W> {
        if let Some(name) = self.current() {
            bail!("tensor {name:?} was never written");
        }
        self.out.flush()?;
        Ok(self.out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> GgufWriter {
        let mut w = GgufWriter::default();
        w.metadata.push((
            "general.architecture".into(),
            MetaValue::Str("bitnet".into()),
        ));
        w.metadata.push(("a.u8".into(), MetaValue::U8(7)));
        w.metadata.push(("a.i8".into(), MetaValue::I8(-7)));
        w.metadata.push(("a.u16".into(), MetaValue::U16(700)));
        w.metadata.push(("a.i16".into(), MetaValue::I16(-700)));
        w.metadata.push(("a.u32".into(), MetaValue::U32(70000)));
        w.metadata.push(("a.i32".into(), MetaValue::I32(-70000)));
        w.metadata.push(("a.f32".into(), MetaValue::F32(0.5)));
        w.metadata.push(("a.bool".into(), MetaValue::Bool(true)));
        w.metadata.push(("a.u64".into(), MetaValue::U64(1 << 40)));
        w.metadata
            .push(("a.i64".into(), MetaValue::I64(-(1 << 40))));
        w.metadata.push(("a.f64".into(), MetaValue::F64(0.25)));
        w.metadata.push((
            "a.arr".into(),
            MetaValue::Array(vec![
                MetaValue::Str("x".into()),
                MetaValue::Str("yz".into()),
            ]),
        ));
        w.metadata.push((
            "a.nested".into(),
            MetaValue::Array(vec![MetaValue::Array(vec![
                MetaValue::I32(1),
                MetaValue::I32(2),
            ])]),
        ));
        w.tensors
            .push(("t.f32".into(), vec![3, 2], 0, (0..24u8).collect()));
        w.tensors
            .push(("t.i2s".into(), vec![128, 1], 36, vec![0x55; 64]));
        w
    }

    #[test]
    fn round_trips_every_value_type() {
        for version in [2, 3] {
            let mut w = sample();
            w.version = version;
            let bytes = w.to_bytes();
            let h = parse_header(&bytes).unwrap();
            assert_eq!(h.version, version);
            assert_eq!(h.metadata, w.metadata);
            assert_eq!(h.tensors.len(), 2);
            assert_eq!(h.tensors[0].dims, vec![3, 2]);
            assert_eq!(h.tensors[0].dtype, GgmlType::F32);
            assert_eq!(h.tensors[1].size, 64);
            assert_eq!(h.tensors[1].offset % 32, 0);
            let t = &h.tensors[0];
            assert_eq!(
                &bytes[t.offset as usize..(t.offset + t.size) as usize],
                &(0..24u8).collect::<Vec<_>>()[..]
            );
        }
    }

    #[test]
    fn honours_general_alignment() {
        let mut w = sample();
        w.alignment = 64;
        w.metadata
            .push(("general.alignment".into(), MetaValue::U32(64)));
        let bytes = w.to_bytes();
        let h = parse_header(&bytes).unwrap();
        assert_eq!(h.alignment, 64);
        assert_eq!(h.data_offset % 64, 0);
        assert_eq!(h.tensors[1].offset % 64, 0);
    }

    #[test]
    fn every_truncation_is_an_error() {
        let bytes = sample().to_bytes();
        for n in 0..bytes.len() - 1 {
            // The last tensor's trailing alignment padding is not data, so cut into real data only.
            if let Ok(h) = parse_header(&bytes[..n]) {
                let end = h.tensors.iter().map(|t| t.offset + t.size).max().unwrap();
                assert!(end <= n as u64);
            }
        }
        assert!(parse_header(&bytes[..40])
            .unwrap_err()
            .message
            .contains("truncated"));
    }

    #[test]
    fn rejects_hostile_headers() {
        let mut w = sample();
        w.tensors.push(("t.q4".into(), vec![32], 2, vec![0; 18]));
        let e = parse_header(&w.to_bytes()).unwrap_err();
        assert!(
            e.message.contains("\"t.q4\"") && e.message.contains("Q4_0"),
            "{e}"
        );

        let mut w = sample();
        w.tensors[0].1 = vec![u64::MAX, 2];
        assert!(parse_header(&w.to_bytes())
            .unwrap_err()
            .message
            .contains("overflow"));

        let mut bytes = sample().to_bytes();
        bytes[8..16].copy_from_slice(&u64::MAX.to_le_bytes()); // tensor count
        assert!(parse_header(&bytes)
            .unwrap_err()
            .message
            .contains("tensor count"));

        let mut bytes = sample().to_bytes();
        bytes[4..8].copy_from_slice(&1u32.to_le_bytes());
        assert!(parse_header(&bytes)
            .unwrap_err()
            .message
            .contains("version"));

        assert!(parse_header(b"GGML\x03\0\0\0")
            .unwrap_err()
            .message
            .contains("magic"));
    }

    #[test]
    fn the_stream_writer_writes_what_to_bytes_writes() {
        let w = sample();
        let tensors: Vec<(String, Vec<u64>, GgmlType)> = w
            .tensors
            .iter()
            .map(|(n, d, t, _)| (n.clone(), d.clone(), GgmlType::from_id(*t).unwrap()))
            .collect();
        let mut sw = GgufStreamWriter::new(Vec::new(), &w.metadata, &tensors).unwrap();
        // The first tensor in two pieces.
        let first = &w.tensors[0].3;
        sw.write_data(&first[..5]).unwrap();
        assert!(sw.end_tensor().is_err());
        sw.write_data(&first[5..]).unwrap();
        sw.end_tensor().unwrap();
        assert!(sw.write_data(&[0; 65]).is_err());
        assert_eq!(sw.current(), Some("t.i2s"));
        sw.write_tensor(&w.tensors[1].3).unwrap();
        assert_eq!(sw.finish().unwrap(), w.to_bytes());

        let sw = GgufStreamWriter::new(Vec::new(), &w.metadata, &tensors).unwrap();
        assert!(sw.finish().unwrap_err().message.contains("t.f32"));
    }
}
